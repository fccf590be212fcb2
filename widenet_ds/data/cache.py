"""Preprocessing: tokenize a corpus once into an on-disk cache of sentence-order instances.

:func:`build_pretraining_cache` streams the corpus in chunks of documents to ``num_proc``
worker processes, which tokenize them and create instances (:func:`create_instances`); the
main process appends the results to the cache files in document order (layout in
:mod:`widenet_ds.data.dataset`). At most a few chunks per worker are in flight, so memory does
not grow with the corpus.

Every random choice about a document (train or eval, segment boundaries, swaps, truncation)
comes from an RNG seeded with ``(seed, document index)``: the cache is the same for any
``num_proc``. A document goes to the eval split with probability ``eval_fraction``.

The cache lives in ``<cache_dir>/pretraining-<key>``, where the key hashes the corpus (each
file's path, size and mtime, or the hub dataset's name, config, split and revision), the
corpus format, the tokenizer, the :class:`PreprocessConfig` and the cache format version. A
second call with the same inputs reuses it; a changed source file gives a new key. The cache is
built in a temporary directory and renamed when complete, so an interrupted build is never
mistaken for a cache, and processes that build the same cache concurrently do not clash (in a
distributed job, still prepare it on one rank first and let the others reuse it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..config import ConfigError
from .corpus import Corpus, CorpusError, Document
from .dataset import FORMAT_VERSION, INDEX_DTYPE, META_FILE, SPLITS, TOKEN_DTYPE, PretrainingDataset, split_files
from .pretraining import Instance, create_instances
from .tokenizer import TokenizerError, load_tokenizer

logger = logging.getLogger(__name__)

DOCUMENTS_PER_TASK = 64  # documents a worker handles per task
TASKS_IN_FLIGHT_PER_PROCESS = 4  # bounds memory: chunks queued or done but not yet written


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings that shape the cached instances (all of them are part of the cache key)."""

    max_seq_length: int = 512  # tokens per instance, [CLS] and both [SEP] included
    short_seq_prob: float = 0.1  # chance that an instance aims at a random shorter length
    eval_fraction: float = 0.01  # chance that a document is held out for evaluation
    seed: int = 12345  # seeds instance creation and the eval split

    def validate(self) -> None:
        """Raise ``ConfigError`` listing every bad field."""
        problems = []
        if isinstance(self.max_seq_length, bool) or not isinstance(self.max_seq_length, int) \
                or self.max_seq_length < 5:
            problems.append(f"max_seq_length must be an integer >= 5, got {self.max_seq_length!r}")
        for name in ("short_seq_prob", "eval_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                problems.append(f"{name} must be a number in [0, 1), got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be an integer >= 0, got {self.seed!r}")
        if problems:
            raise ConfigError("PreprocessConfig", problems)


@dataclass(frozen=True)
class PretrainingCache:
    """A complete preprocessing cache."""

    path: Path  # the cache directory
    meta: dict[str, Any]  # contents of meta.json: settings, counts, corpus statistics
    reused: bool  # True if this call found the cache instead of building it

    def dataset(self, split: str = "train") -> PretrainingDataset:
        """The memory-mapped instances of ``split`` ("train" or "eval")."""
        return PretrainingDataset(self.path, split)


# ---------------------------------------------------------------------------------------------
# Workers: tokenize documents and create their instances


@dataclass
class _Block:
    """Instances of one split, flattened for writing."""

    tokens: np.ndarray  # (T,) segment A then B of each instance, back to back
    rows: np.ndarray  # (N, 3) len_a, len_b, sop_label

    @classmethod
    def of(cls, instances: list[Instance]) -> _Block:
        tokens = [t for i in instances for t in (*i.tokens_a, *i.tokens_b)]
        rows = [(len(i.tokens_a), len(i.tokens_b), i.sop_label) for i in instances]
        return cls(np.array(tokens, dtype=TOKEN_DTYPE), np.array(rows, dtype=INDEX_DTYPE).reshape(-1, 3))


class _ChunkWorker:
    """Tokenizes chunks of documents and turns each document into instances."""

    def __init__(self, tokenizer_json: str, config: PreprocessConfig):
        self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.config = config

    def __call__(self, task: tuple[int, list[Document]]) -> tuple[int, dict[str, _Block]]:
        """Instances of documents ``first, first + 1, ...`` by split; also returns the document count."""
        first, documents = task
        encodings = self.tokenizer.encode_batch([s for d in documents for s in d], add_special_tokens=False)
        sentence_ids = iter([e.ids for e in encodings])
        instances: dict[str, list[Instance]] = {split: [] for split in SPLITS}
        for number, document in enumerate(documents, start=first):
            rng = np.random.default_rng([self.config.seed, number])
            split = "eval" if rng.random() < self.config.eval_fraction else "train"
            tokenized = [next(sentence_ids) for _ in document]
            instances[split] += create_instances(tokenized, self.config.max_seq_length,
                                                 self.config.short_seq_prob, rng=rng)
        return len(documents), {split: _Block.of(found) for split, found in instances.items()}


_worker: _ChunkWorker | None = None  # the worker of a pool process


def _start_worker(tokenizer_json: str, config: PreprocessConfig) -> None:
    global _worker
    _worker = _ChunkWorker(tokenizer_json, config)


def _run_worker(task: tuple[int, list[Document]]) -> tuple[int, dict[str, _Block]]:
    return _worker(task)


def _tasks(documents: Iterable[Document]) -> Iterator[tuple[int, list[Document]]]:
    """Chunks of ``DOCUMENTS_PER_TASK`` documents, each with the index of its first document."""
    chunk: list[Document] = []
    first = 0
    for document in documents:
        chunk.append(document)
        if len(chunk) == DOCUMENTS_PER_TASK:
            yield first, chunk
            first += len(chunk)
            chunk = []
    if chunk:
        yield first, chunk


def _process_in_order(tasks: Iterator[tuple[int, list[Document]]], tokenizer_json: str, config: PreprocessConfig,
                      num_proc: int) -> Iterator[tuple[int, dict[str, _Block]]]:
    """Results of the tasks, in task order, computed in ``num_proc`` processes (inline for 1)."""
    if num_proc == 1:
        yield from map(_ChunkWorker(tokenizer_json, config), tasks)
        return
    # fork starts workers without re-importing torch and transformers; they only use `tokenizers` and numpy
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(num_proc, initializer=_start_worker, initargs=(tokenizer_json, config)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_run_worker, (task,)))
            if len(pending) >= num_proc * TASKS_IN_FLIGHT_PER_PROCESS:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------
# Writing


class _SplitWriter:
    """Appends the instances of one split to its token and index files."""

    def __init__(self, directory: Path, split: str, stack: ExitStack):
        tokens_file, index_file = split_files(directory, split)
        self.tokens = stack.enter_context(open(tokens_file, "wb"))
        self.index = stack.enter_context(open(index_file, "wb"))
        self.num_tokens = 0
        self.num_instances = 0

    def write(self, block: _Block) -> None:
        lengths = block.rows[:, 0] + block.rows[:, 1]
        offsets = self.num_tokens + np.cumsum(lengths) - lengths
        np.column_stack([offsets, block.rows]).astype(INDEX_DTYPE).tofile(self.index)
        block.tokens.tofile(self.tokens)
        self.num_tokens += int(lengths.sum())
        self.num_instances += len(block.rows)


def _build(corpus: Corpus, tokenizer_json: str, config: PreprocessConfig, num_proc: int,
           directory: Path) -> dict[str, Any]:
    """Write every split into ``directory``; returns the counts."""
    with ExitStack() as stack:
        writers = {split: _SplitWriter(directory, split, stack) for split in SPLITS}
        progress = stack.enter_context(tqdm(desc="preprocessing", unit="doc", disable=None))
        for documents, blocks in _process_in_order(_tasks(corpus), tokenizer_json, config, num_proc):
            for split, block in blocks.items():
                writers[split].write(block)
            progress.update(documents)
    return {split: {"instances": w.num_instances, "tokens": w.num_tokens} for split, w in writers.items()}


def _check_built(corpus: Corpus, splits: dict[str, Any], config: PreprocessConfig) -> None:
    """Raise ``CorpusError`` if the corpus gave nothing to train on; warn about an empty eval split."""
    where = ", ".join(map(str, corpus.files)) or str(corpus.hub)
    if corpus.stats.documents == 0:
        raise CorpusError(f"no text in the corpus ({where}): every line was blank or skipped "
                          f"({corpus.stats.skipped_lines} skipped)")
    if splits["train"]["instances"] == 0:
        raise CorpusError(f"the corpus ({where}) gave no training instance from {corpus.stats.documents} "
                          f"document(s); documents need at least two tokens (eval_fraction={config.eval_fraction})")
    if config.eval_fraction > 0 and splits["eval"]["instances"] == 0:
        logger.warning("the eval split is empty: %d document(s) at eval_fraction=%s", corpus.stats.documents,
                       config.eval_fraction)


def _publish(built: Path, final: Path) -> None:
    """Move a complete cache into place; if another process got there first, keep theirs."""
    try:
        os.rename(built, final)
    except OSError:
        if not (final / META_FILE).is_file():
            raise
        shutil.rmtree(built)


def _tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{type(tokenizer).__name__} has no `tokenizers` backend; preprocessing needs one "
                             f"(load the tokenizer with widenet_ds.data.load_tokenizer)")
    return backend.to_str()


def cache_key(corpus_fingerprint: dict[str, Any], tokenizer_json: str, config: PreprocessConfig) -> str:
    """16 hex digits identifying the cache of a corpus (``Corpus.fingerprint()``), tokenizer and configuration."""
    identity = {"format_version": FORMAT_VERSION, "corpus": corpus_fingerprint,
                "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
                "config": dataclasses.asdict(config)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def build_pretraining_cache(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase | str | Path,
    cache_dir: str | Path,
    config: PreprocessConfig = PreprocessConfig(),
    num_proc: int = 1,
) -> PretrainingCache:
    """Tokenize ``corpus`` into sentence-order instances cached on disk, or reuse the cache.

    Args:
        corpus: the documents (its files were checked when it was built).
        tokenizer: a tokenizer from :func:`load_tokenizer`, or its directory.
        cache_dir: parent directory of the caches (created if needed).
        config: instance settings; part of the cache key.
        num_proc: worker processes for tokenization (the result does not depend on it).

    Returns:
        The cache; ``.dataset("train")`` and ``.dataset("eval")`` read it.

    Raises:
        ConfigError: for bad ``config`` values or ``num_proc``.
        CorpusError: if the corpus holds no text or gives no training instance.
        TokenizerError: if the tokenizer is missing or lacks a ``tokenizers`` backend.
    """
    config.validate()
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ConfigError("build_pretraining_cache", [f"num_proc must be an integer >= 1, got {num_proc!r}"])
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    tokenizer_json = _tokenizer_json(tokenizer)
    fingerprint = corpus.fingerprint()
    root = Path(cache_dir)
    final = root / f"pretraining-{cache_key(fingerprint, tokenizer_json, config)}"
    if (final / META_FILE).is_file():
        logger.info("reusing the pretraining cache %s", final)
        return PretrainingCache(final, json.loads((final / META_FILE).read_text()), reused=True)

    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    logger.info("preprocessing the corpus into %s with %d process(es)", final, num_proc)
    try:
        splits = _build(corpus, tokenizer_json, config, num_proc, building)
        _check_built(corpus, splits, config)
        meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(config),
                "vocab_size": len(tokenizer), "corpus": fingerprint,
                "stats": dataclasses.asdict(corpus.stats), "splits": splits}
        (building / META_FILE).write_text(json.dumps(meta, indent=2))
        _publish(building, final)
    finally:
        if building.exists():
            shutil.rmtree(building)
    logger.info("cached %d train and %d eval instances from %d documents (%d lines skipped)",
                splits["train"]["instances"], splits["eval"]["instances"], corpus.stats.documents,
                corpus.stats.skipped_lines)
    return PretrainingCache(final, meta, reused=False)
