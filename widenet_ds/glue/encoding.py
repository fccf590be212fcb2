"""Turn GLUE examples into model inputs with any Hugging Face tokenizer, and pad them into batches."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from .data import GlueExample

Features = dict[str, Any]  # input_ids, attention_mask, token_type_ids: list[int]; labels: int | float


def encode(examples: Sequence[GlueExample] | datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
           max_length: int) -> list[Features]:
    """Tokenize examples (as pairs when they have ``text_b``), truncated to ``max_length`` tokens.

    Returns one dict per example with ``input_ids``, ``attention_mask``, ``token_type_ids``
    and, when the examples are labelled, ``labels`` (class index, or score for STS-B). No
    padding here: ``collate`` pads each batch to its longest example.
    """
    rows = [e if isinstance(e, GlueExample) else GlueExample(**e) for e in examples]
    if not rows:
        return []
    has_b = {r.text_b is not None for r in rows}
    has_label = {r.label is not None for r in rows}
    if len(has_b) > 1 or len(has_label) > 1:
        raise ValueError("encode needs examples of one kind: all pairs or all single sentences, "
                         "all labelled or all unlabelled; split mixed inputs first")
    encoded = tokenizer([r.text_a for r in rows], [r.text_b for r in rows] if True in has_b else None,
                        truncation=True, max_length=max_length, return_attention_mask=True,
                        return_token_type_ids=True)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    features = [{key: encoded[key][i] for key in keys} for i in range(len(rows))]
    if True in has_label:
        for feature, row in zip(features, rows):
            feature["labels"] = row.label
    return features


def collate(features: Sequence[Mapping[str, Any]], pad_token_id: int | None,
            pad_to_multiple_of: int | None = None, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad ``encode`` outputs to the longest in the batch (rounded up to ``pad_to_multiple_of``, but not
    past ``max_length``).

    Returns (B, T) int64 ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` and
    ``token_type_ids`` (padded with 0), and (B,) ``labels`` when present: int64 class
    indices, or float32 scores for STS-B. For a DataLoader:
    ``collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id)``.
    """
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id; this tokenizer has none: set tokenizer.pad_token first")
    length = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        rounded = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
        length = rounded if max_length is None else max(length, min(rounded, max_length))
    batch = {key: torch.tensor([list(f[key]) + [pad] * (length - len(f[key])) for f in features])
             for key, pad in (("input_ids", pad_token_id), ("attention_mask", 0), ("token_type_ids", 0))}
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([f["labels"] for f in features])
    return batch
