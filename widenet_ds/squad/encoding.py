"""SQuAD questions -> model inputs: ``[CLS] question [SEP] context window [SEP]`` with a fast
(offset-tracking) Hugging Face tokenizer, the project's SentencePiece tokenizer included.

A context longer than the room left by the question is cut into windows; consecutive windows
share ``doc_stride`` tokens (the ``stride`` of Hugging Face tokenizers, as in ``run_qa.py``).
The question is cut to ``max_query_length`` tokens first (at a token boundary, so the text
fed to the tokenizer is the question's prefix).

Train features carry ``start_positions`` / ``end_positions``: the tokens holding the first
answer's first and last character, or the [CLS] position when the answer is not inside that
window (or the question is unanswerable). Eval features carry ``example_index`` (the question
they come from) and ``offset_mapping``: each token's (start, end) characters in the context,
None for tokens outside the context, so that spans decode to context text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..glue import collate as collate_inputs
from .data import SquadDataError, SquadExample

Feature = dict[str, Any]
SPECIAL_TOKENS = 3  # [CLS] question [SEP] context [SEP]


def check_lengths(max_seq_length: int, max_query_length: int, doc_stride: int) -> list[str]:
    """Problems of the window settings: the context needs room, and windows must advance."""
    room = max_seq_length - max_query_length - SPECIAL_TOKENS
    if room < 1:
        return [f"--max_seq_length {max_seq_length} leaves no room for the context after a question of "
                f"--max_query_length {max_query_length} and {SPECIAL_TOKENS} special tokens"]
    if doc_stride >= room:
        return [f"--doc_stride {doc_stride} (tokens shared by consecutive windows) must be smaller than the "
                f"context room of a window, {room} = max_seq_length {max_seq_length} - max_query_length "
                f"{max_query_length} - {SPECIAL_TOKENS}"]
    return []


def truncate_questions(questions: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_query_length: int) -> list[str]:
    """Each question (leading white space removed) cut after its ``max_query_length``-th token."""
    questions = [q.lstrip() for q in questions]
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [q if len(offsets) <= max_query_length else q[:offsets[max_query_length - 1][1]]
            for q, offsets in zip(questions, encoded["offset_mapping"])]


def _windows(examples: Sequence[SquadExample], tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
             doc_stride: int, max_query_length: int):
    if not getattr(tokenizer, "is_fast", False):
        raise SquadDataError(f"the tokenizer {type(tokenizer).__name__} does not track character offsets; SQuAD "
                             "needs a fast tokenizer (a folder with tokenizer.json)")
    return tokenizer(truncate_questions([e.question for e in examples], tokenizer, max_query_length),
                     [e.context for e in examples], truncation="only_second", max_length=max_seq_length,
                     stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                     return_token_type_ids=True, return_attention_mask=True, padding=False)


def _inputs(encoded, i: int) -> Feature:
    return {key: encoded[key][i] for key in ("input_ids", "attention_mask", "token_type_ids")}


def answer_tokens(offsets: Sequence[tuple[int, int]], sequence_ids: Sequence[int | None], start_char: int,
                  end_char: int) -> tuple[int, int] | None:
    """The first and last context tokens covering characters ``start_char:end_char``, or None when the
    window does not hold all of them."""
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return None
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def encode_train(examples: Sequence[SquadExample], tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
                 doc_stride: int, max_query_length: int) -> list[Feature]:
    """Train windows with the answer's token positions ([CLS] where the window has no answer)."""
    if not examples:
        return []
    encoded = _windows(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    features = []
    for i, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        feature = _inputs(encoded, i)
        cls_index = feature["input_ids"].index(tokenizer.cls_token_id)
        example = examples[example_index]
        span = None
        if example.answers:
            answer = example.answers[0]
            span = answer_tokens(encoded["offset_mapping"][i], encoded.sequence_ids(i), answer.start,
                                 answer.start + len(answer.text))
        feature["start_positions"], feature["end_positions"] = span or (cls_index, cls_index)
        features.append(feature)
    return features


def encode_eval(examples: Sequence[SquadExample], tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
                doc_stride: int, max_query_length: int) -> list[Feature]:
    """Eval windows with ``example_index`` and the context ``offset_mapping`` (None outside it)."""
    if not examples:
        return []
    encoded = _windows(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    features = []
    for i, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        feature = _inputs(encoded, i)
        feature["example_index"] = example_index
        feature["offset_mapping"] = [tuple(o) if s == 1 else None
                                     for o, s in zip(encoded["offset_mapping"][i], encoded.sequence_ids(i))]
        features.append(feature)
    return features


def collate(features: Sequence[Mapping[str, Any]], pad_token_id: int | None, pad_to_multiple_of: int | None = None,
            max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch of features (``widenet_ds.glue.collate``) and add (B,) ``start_positions`` and
    ``end_positions`` when the features have them; eval-only keys are left out."""
    batch = collate_inputs([{k: f[k] for k in ("input_ids", "attention_mask", "token_type_ids")} for f in features],
                           pad_token_id, pad_to_multiple_of, max_length)
    for key in ("start_positions", "end_positions"):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features])
    return batch
