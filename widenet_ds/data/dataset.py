"""Reading a preprocessing cache, and turning its instances into masked batches.

A cache directory (written by :func:`widenet_ds.data.build_pretraining_cache`) holds, for each
split in ``SPLITS``:

- ``<split>.tokens.bin``: int32 token ids of every instance, segment A then segment B, back to back;
- ``<split>.index.bin``: int64 rows ``(offset, len_a, len_b, sop_label)``, one per instance;

and ``meta.json`` (settings, counts, corpus statistics, and the size and sha256 of every
``.bin`` file), written last. Both ``.bin`` files are memory-mapped, so a cache larger than
memory can be trained on. Opening a split checks cheaply that its files agree with the counts in
``meta.json`` (sizes, and where the last instance ends), so a truncated file is an error, not
wrong data; ``build_pretraining_cache`` verifies the sha256 of every file before reusing a cache.

Masking is dynamic: :class:`PretrainingCollator` masks each example with an RNG seeded from
``(seed, epoch, example index)``, so a batch does not depend on the number of DataLoader
workers, and a resumed run sees exactly the masks it would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from ..config import ConfigError
from .pretraining import IGNORE_INDEX, mask_tokens, num_to_predict

FORMAT_VERSION = 2  # bump when the layout changes: old caches are then rebuilt (2: meta.json records sha256s)
SPLITS = ("train", "eval")
TOKEN_DTYPE = np.int32
INDEX_DTYPE = np.int64
INDEX_COLUMNS = 4  # offset, len_a, len_b, sop_label
META_FILE = "meta.json"


class CacheError(ValueError):
    """A directory that is not a usable preprocessing cache; the message says what to do."""


def split_files(directory: Path, split: str) -> tuple[Path, Path]:
    """The token file and the index file of one split."""
    return directory / f"{split}.tokens.bin", directory / f"{split}.index.bin"


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a complete cache.

    Raises:
        CacheError: if ``directory`` has no ``meta.json``, it is not a JSON object, or it was
            written in another format version.
    """
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CacheError(f"{directory} is not a pretraining cache (no {META_FILE}); build one with "
                         f"widenet_ds.data.build_pretraining_cache(...)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CacheError(f"{path} is damaged ({error}); delete {directory} and build the cache again with "
                         f"build_pretraining_cache(...)") from error
    if not isinstance(meta, dict):
        raise CacheError(f"{path} is damaged (a JSON {type(meta).__name__}, not an object); delete {directory} "
                         f"and build the cache again with build_pretraining_cache(...)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{directory} has cache format {meta.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}; rebuild it with build_pretraining_cache(...)")
    return meta


class PretrainingDataset(Dataset):
    """Memory-mapped instances of one split of a preprocessing cache.

    ``dataset[i]`` and ``dataset[(epoch, i)]`` (what :class:`ResumableDistributedSampler`
    yields) return a dict with ``tokens_a``, ``tokens_b`` (int32 arrays), ``sop_label``,
    ``index`` and ``epoch``; the last two seed the masking in :class:`PretrainingCollator`.

    Args:
        directory: the cache directory (``PretrainingCache.path``).
        split: ``"train"`` or ``"eval"``.
    """

    def __init__(self, directory: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.directory = Path(directory)
        self.split = split
        self.meta = read_meta(self.directory)
        self.num_instances = int(self.meta["splits"][split]["instances"])
        self._check_files()
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None  # opened on first use, in each worker

    def _check_files(self) -> None:
        """Raise ``CacheError`` unless the split's files agree with ``meta.json``: both sizes match its
        counts, and the last instance ends where the token file ends. Reads one index row, not the files.
        """
        num_tokens = int(self.meta["splits"][self.split]["tokens"])
        tokens_file, index_file = split_files(self.directory, self.split)
        fix = f"delete {self.directory} and build the cache again with build_pretraining_cache(...)"
        row_bytes = INDEX_COLUMNS * np.dtype(INDEX_DTYPE).itemsize
        expected = {index_file: (self.num_instances * row_bytes, f"{self.num_instances:,} instances"),
                    tokens_file: (num_tokens * np.dtype(TOKEN_DTYPE).itemsize, f"{num_tokens:,} tokens")}
        for path, (size, what) in expected.items():
            if not path.is_file():
                raise CacheError(f"{path} is missing from the cache; {fix}")
            if path.stat().st_size != size:
                raise CacheError(f"{path} has {path.stat().st_size:,} bytes, but {META_FILE} counts {what} in "
                                 f"split {self.split!r}, which take {size:,}: the file is truncated or was "
                                 f"overwritten; {fix}")
        if self.num_instances == 0:
            return
        last_row = (self.num_instances - 1) * row_bytes
        last = np.fromfile(index_file, dtype=INDEX_DTYPE, count=INDEX_COLUMNS, offset=last_row)
        offset, len_a, len_b, _ = (int(v) for v in last)
        if min(offset, len_a, len_b) < 0 or offset + len_a + len_b != num_tokens:
            raise CacheError(f"{index_file}: the last instance (offset {offset}, lengths {len_a} + {len_b}) does not "
                             f"end where {tokens_file.name} ends (token {num_tokens:,}): the index is damaged; {fix}")

    def __len__(self) -> int:
        return self.num_instances

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}  # never pickle the memory maps' contents

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            tokens_file, index_file = split_files(self.directory, self.split)
            if self.num_instances == 0:
                self._arrays = (np.zeros(0, TOKEN_DTYPE), np.zeros((0, INDEX_COLUMNS), INDEX_DTYPE))
            else:
                self._arrays = (np.memmap(tokens_file, dtype=TOKEN_DTYPE, mode="r"),
                                np.memmap(index_file, dtype=INDEX_DTYPE, mode="r").reshape(-1, INDEX_COLUMNS))
        return self._arrays

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not -self.num_instances <= index < self.num_instances:
            raise IndexError(f"index {index} out of range for {self.num_instances} {self.split} instances")
        index %= self.num_instances
        tokens, rows = self._open()
        offset, len_a, len_b, sop_label = (int(v) for v in rows[index])
        return {"tokens_a": np.array(tokens[offset:offset + len_a]),
                "tokens_b": np.array(tokens[offset + len_a:offset + len_a + len_b]),
                "sop_label": sop_label, "index": index, "epoch": int(epoch)}


def check_masking(mask_prob: float, max_ngram: int, max_predictions: int | None = None) -> None:
    """Raise ``ConfigError`` listing every masking setting out of range."""
    problems = []
    if not 0 < mask_prob < 1:
        problems.append(f"mask_prob must be in (0, 1), got {mask_prob!r}")
    if max_ngram < 1:
        problems.append(f"max_ngram must be >= 1, got {max_ngram!r}")
    if max_predictions is not None and max_predictions < 1:
        problems.append(f"max_predictions must be >= 1 or None, got {max_predictions!r}")
    if problems:
        raise ConfigError("masking settings", problems)


@dataclass(frozen=True)
class PretrainingCollator:
    """Assembles ``[CLS] A [SEP] B [SEP]``, masks it dynamically and pads a batch.

    Each example is masked with ``numpy.random.default_rng([seed, epoch, index])``, so its masks
    depend only on those three numbers. Batches are dicts of int64 tensors ``input_ids``,
    ``attention_mask``, ``token_type_ids``, ``labels`` (-100 where nothing is predicted) of
    shape (B, T), ``mlm_positions`` of shape (B, P) and ``sentence_order_label`` of shape (B,).
    T is the longest example of the batch, or ``pad_to_length``. ``mlm_positions`` lists each
    row's predicted positions in order, padded with -1; P = :func:`num_to_predict` of T, a bound
    on every row's count, so the MLM head can run on B x P positions instead of B x T (BERT's
    ``masked_lm_positions``).
    """

    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    mask_token_id: int
    vocab_size: int  # random replacements are drawn from [0, vocab_size)
    seed: int = 0  # seeds the masking
    mask_prob: float = 0.15  # share of each sequence (special tokens included) that is predicted
    max_ngram: int = 3  # longest masked n-gram
    max_predictions: int | None = None  # cap on predicted positions per sequence (ALBERT: 20 at 512)
    pad_to_length: int | None = None  # pad every batch to this length instead of its longest example

    def __post_init__(self) -> None:
        check_masking(self.mask_prob, self.max_ngram, self.max_predictions)

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, **settings: Any) -> PretrainingCollator:
        """A collator using the tokenizer's special ids and vocabulary size; ``settings`` fill the other fields."""
        return cls(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                   pad_token_id=tokenizer.pad_token_id, mask_token_id=tokenizer.mask_token_id,
                   vocab_size=len(tokenizer), **settings)

    def assemble(self, tokens_a: np.ndarray, tokens_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(input_ids, token_type_ids, special_tokens_mask)`` of ``[CLS] A [SEP] B [SEP]``."""
        input_ids = np.concatenate([[self.cls_token_id], tokens_a, [self.sep_token_id],
                                    tokens_b, [self.sep_token_id]]).astype(np.int64)
        first_b = len(tokens_a) + 2
        token_type_ids = np.zeros_like(input_ids)
        token_type_ids[first_b:] = 1
        special = np.zeros(len(input_ids), dtype=bool)
        special[[0, first_b - 1, len(input_ids) - 1]] = True
        return input_ids, token_type_ids, special

    def mask_example(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        """Assemble and mask one example from :class:`PretrainingDataset`."""
        input_ids, token_type_ids, special = self.assemble(example["tokens_a"], example["tokens_b"])
        rng = np.random.default_rng([self.seed, example["epoch"], example["index"]])
        masked, labels = mask_tokens(input_ids, special, self.vocab_size, self.mask_token_id, rng,
                                     self.mask_prob, self.max_ngram, self.max_predictions)
        return {"input_ids": masked, "token_type_ids": token_type_ids, "labels": labels}

    def mlm_positions(self, labels: np.ndarray) -> np.ndarray:
        """(B, P) positions of the labelled tokens of each row of ``labels`` (B, T), padded with -1."""
        bound = num_to_predict(labels.shape[1], self.mask_prob, self.max_predictions)
        positions = np.full((labels.shape[0], bound), -1, dtype=np.int64)
        for row, row_labels in enumerate(labels):
            found = np.flatnonzero(row_labels != IGNORE_INDEX)
            assert len(found) <= bound, f"{len(found)} masked positions, more than the bound {bound}"
            positions[row, :len(found)] = found
        return positions

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        masked = [self.mask_example(e) for e in examples]
        longest = max(len(m["input_ids"]) for m in masked)
        length = self.pad_to_length or longest
        if length < longest:
            raise ValueError(f"pad_to_length={length} is shorter than an example of {longest} tokens; "
                             f"set it to at least the cache's max_seq_length")
        batch = {
            "input_ids": np.full((len(masked), length), self.pad_token_id, dtype=np.int64),
            "attention_mask": np.zeros((len(masked), length), dtype=np.int64),
            "token_type_ids": np.zeros((len(masked), length), dtype=np.int64),
            "labels": np.full((len(masked), length), IGNORE_INDEX, dtype=np.int64),
        }
        for row, example in enumerate(masked):
            size = len(example["input_ids"])
            batch["attention_mask"][row, :size] = 1
            for name in ("input_ids", "token_type_ids", "labels"):
                batch[name][row, :size] = example[name]
        batch["mlm_positions"] = self.mlm_positions(batch["labels"])
        tensors = {name: torch.from_numpy(array) for name, array in batch.items()}
        tensors["sentence_order_label"] = torch.tensor([e["sop_label"] for e in examples], dtype=torch.long)
        return tensors
