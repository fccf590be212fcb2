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

``meta.json`` records the size and sha256 of every ``.bin`` file, hashed as the bytes are
written. Before a cache is reused its files are checked against that record (sizes always,
sha256 unless ``verify=False``); a truncated or altered cache is removed and built again, so
damaged data is never trained on. Every build also reports how much of the text it read ended
up in the cache: sentences longer than an instance are truncated, and text without sentence
punctuation can lose almost everything that way, so a build that keeps less than
``KEPT_SHARE_WARNING`` of the tokens warns and one that keeps less than ``KEPT_SHARE_MINIMUM``
is refused.
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
from .dataset import (
    FORMAT_VERSION,
    INDEX_DTYPE,
    META_FILE,
    SPLITS,
    TOKEN_DTYPE,
    CacheError,
    PretrainingDataset,
    read_meta,
    split_files,
)
from .pretraining import Instance, create_instances
from .tokenizer import TokenizerError, load_tokenizer

logger = logging.getLogger(__name__)

DOCUMENTS_PER_TASK = 64  # documents a worker handles per task
TASKS_IN_FLIGHT_PER_PROCESS = 4  # bounds memory: chunks queued or done but not yet written
HASH_CHUNK_BYTES = 8 << 20  # read size when verifying a file's sha256
KEPT_SHARE_WARNING = 0.8  # warn when the cache keeps less than this share of the tokens read
KEPT_SHARE_MINIMUM = 0.1  # refuse to publish a cache that keeps less than this share


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
class _Counts:
    """What workers read, for the report of what was kept (sentences are counted by the corpus)."""

    tokens: int = 0  # tokens of every sentence, special tokens not included
    long_sentences: int = 0  # sentences longer than max_seq_length - 3 tokens: truncated in any instance
    long_sentence_overflow: int = 0  # their tokens beyond max_seq_length - 3: at least these are dropped

    def add(self, other: _Counts) -> None:
        for name, value in dataclasses.asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


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

    def __call__(self, task: tuple[int, list[Document]]) -> tuple[int, _Counts, dict[str, _Block]]:
        """Instances of documents ``first, first + 1, ...`` by split, with the document count and what was read."""
        first, documents = task
        encodings = self.tokenizer.encode_batch([s for d in documents for s in d], add_special_tokens=False)
        lengths = [len(e.ids) for e in encodings]
        overflows = [n - (self.config.max_seq_length - 3) for n in lengths]
        counts = _Counts(tokens=sum(lengths), long_sentences=sum(o > 0 for o in overflows),
                         long_sentence_overflow=sum(o for o in overflows if o > 0))
        sentence_ids = iter([e.ids for e in encodings])
        instances: dict[str, list[Instance]] = {split: [] for split in SPLITS}
        for number, document in enumerate(documents, start=first):
            rng = np.random.default_rng([self.config.seed, number])
            split = "eval" if rng.random() < self.config.eval_fraction else "train"
            tokenized = [next(sentence_ids) for _ in document]
            instances[split] += create_instances(tokenized, self.config.max_seq_length,
                                                 self.config.short_seq_prob, rng=rng)
        return len(documents), counts, {split: _Block.of(found) for split, found in instances.items()}


_worker: _ChunkWorker | None = None  # the worker of a pool process


def _start_worker(tokenizer_json: str, config: PreprocessConfig) -> None:
    global _worker
    _worker = _ChunkWorker(tokenizer_json, config)


def _run_worker(task: tuple[int, list[Document]]) -> tuple[int, _Counts, dict[str, _Block]]:
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
                      num_proc: int) -> Iterator[tuple[int, _Counts, dict[str, _Block]]]:
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


class _HashedFile:
    """A binary file being written, with the size and sha256 of the bytes written so far.

    The bytes are hashed on their way to the file, so recording the sha256 costs no second read.
    """

    def __init__(self, path: Path, stack: ExitStack):
        self.name = path.name
        self.handle = stack.enter_context(open(path, "wb"))
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # native byte order, as ndarray.tofile writes
        self.sha256.update(data)
        self.handle.write(data)
        self.size += data.nbytes

    def record(self) -> dict[str, Any]:
        """What ``meta.json`` keeps of this file."""
        return {"bytes": self.size, "sha256": self.sha256.hexdigest()}


class _SplitWriter:
    """Appends the instances of one split to its token and index files."""

    def __init__(self, directory: Path, split: str, stack: ExitStack):
        tokens_file, index_file = split_files(directory, split)
        self.tokens = _HashedFile(tokens_file, stack)
        self.index = _HashedFile(index_file, stack)
        self.num_tokens = 0
        self.num_instances = 0

    def write(self, block: _Block) -> None:
        lengths = block.rows[:, 0] + block.rows[:, 1]
        offsets = self.num_tokens + np.cumsum(lengths) - lengths
        self.index.write(np.column_stack([offsets, block.rows]).astype(INDEX_DTYPE))
        self.tokens.write(block.tokens)
        self.num_tokens += int(lengths.sum())
        self.num_instances += len(block.rows)


@dataclass
class _Built:
    """What ``_build`` wrote: counts per split, each file's size and sha256, and what the workers read."""

    splits: dict[str, dict[str, int]]
    files: dict[str, dict[str, Any]]
    read: _Counts


def _build(corpus: Corpus, tokenizer_json: str, config: PreprocessConfig, num_proc: int,
           directory: Path) -> _Built:
    """Write every split into ``directory``."""
    read = _Counts()
    with ExitStack() as stack:
        writers = {split: _SplitWriter(directory, split, stack) for split in SPLITS}
        progress = stack.enter_context(tqdm(desc="preprocessing", unit="doc", disable=None))
        for documents, counts, blocks in _process_in_order(_tasks(corpus), tokenizer_json, config, num_proc):
            read.add(counts)
            for split, block in blocks.items():
                writers[split].write(block)
            progress.update(documents)
    splits = {split: {"instances": w.num_instances, "tokens": w.num_tokens} for split, w in writers.items()}
    files = {f.name: f.record() for w in writers.values() for f in (w.tokens, w.index)}
    return _Built(splits, files, read)


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


# ---------------------------------------------------------------------------------------------
# What was read and what was kept


def _kept_stats(corpus: Corpus, built: _Built) -> dict[str, Any]:
    """The corpus counters plus what was read and what ended up in the cache (train and eval together)."""
    tokens_kept = sum(counts["tokens"] for counts in built.splits.values())
    return {**dataclasses.asdict(corpus.stats), "tokens_read": built.read.tokens,
            "long_sentences": built.read.long_sentences, "long_sentence_overflow": built.read.long_sentence_overflow,
            "instances_kept": sum(counts["instances"] for counts in built.splits.values()),
            "tokens_kept": tokens_kept, "kept_share": tokens_kept / built.read.tokens if built.read.tokens else 0.0}


def _summary(stats: dict[str, Any], splits: dict[str, Any], config: PreprocessConfig) -> str:
    """One line: what was read, what was kept, what was truncated or skipped."""
    return (f"read {stats['documents']:,} documents, {stats['sentences']:,} sentences, {stats['tokens_read']:,} "
            f"tokens; kept {stats['tokens_kept']:,} tokens ({stats['kept_share']:.1%}) in "
            f"{splits['train']['instances']:,} train and {splits['eval']['instances']:,} eval instances; "
            f"{stats['long_sentences']:,} sentences longer than {config.max_seq_length - 3} tokens were truncated; "
            f"{stats['skipped_lines']:,} lines skipped")


def _reads_lines(corpus: Corpus) -> bool:
    """Whether the corpus is line-oriented text (.txt files or records read as lines), not one document per record."""
    if corpus.format.records == "lines":
        return True
    return bool(corpus.files) and all(path.name.lower().endswith((".txt", ".txt.gz")) for path in corpus.files)


def _why_tokens_were_dropped(stats: dict[str, Any], config: PreprocessConfig, corpus: Corpus) -> str:
    """The main cause of a low kept share and its fix, in terms of the user's text and settings.

    Sentences longer than an instance lose at least their overflow; when that accounts for most
    of what was dropped, the cause is (almost always) text without sentence punctuation, which
    the splitter reads as one giant sentence. Otherwise instances are too short for the sentences:
    the sentence that makes an instance overflow is cut.
    """
    limit = config.max_seq_length - 3
    dropped = stats["tokens_read"] - stats["tokens_kept"]
    if 2 * stats["long_sentence_overflow"] < dropped:
        average = stats["tokens_read"] / max(stats["sentences"], 1)
        return (f"an instance holds at most {limit} tokens (max_seq_length {config.max_seq_length} - 3) and the "
                f"sentence that makes it overflow is cut, while sentences average {average:.0f} tokens: raise "
                f"max_seq_length")
    if _reads_lines(corpus):
        where, fix = "", ("separate paragraphs with a blank line, or put each line in its own record of a .jsonl "
                          "file (one document per record)")
    else:
        where, fix = "inside a record, ", ("separate paragraphs inside a record with a blank line (\\n\\n), or split "
                                           "long records into shorter ones")
    return (f"{stats['long_sentences']:,} of {stats['sentences']:,} sentences are longer than max_seq_length "
            f"{config.max_seq_length} (more than {limit} tokens) and are truncated to it; {where}a line break is "
            f"read as a space unless the line ends with sentence punctuation (. ! ?), so lines without it run "
            f"together into one giant sentence up to the next blank line: end sentences with punctuation, {fix}; "
            f"or raise max_seq_length")


def _report_kept(stats: dict[str, Any], splits: dict[str, Any], config: PreprocessConfig, corpus: Corpus, *,
                 refuse: bool) -> None:
    """Log what was read and kept; below ``KEPT_SHARE_WARNING`` of the tokens warn why, and below
    ``KEPT_SHARE_MINIMUM`` raise ``CorpusError`` instead if ``refuse``.
    """
    logger.info("%s", _summary(stats, splits, config))
    if stats["kept_share"] >= KEPT_SHARE_WARNING:
        return
    share = f"only {stats['kept_share']:.1%} of the {stats['tokens_read']:,} tokens read were kept"
    why = _why_tokens_were_dropped(stats, config, corpus)
    if refuse and stats["kept_share"] < KEPT_SHARE_MINIMUM:
        raise CorpusError(f"{share} (less than {KEPT_SHARE_MINIMUM:.0%}, so no cache was written): {why}")
    logger.warning("%s in the pretraining cache: %s", share, why)


# ---------------------------------------------------------------------------------------------
# Publishing, verifying and reusing


def _publish(built: Path, final: Path) -> None:
    """Move a complete cache into place; if another process got there first, keep theirs."""
    try:
        os.rename(built, final)
    except OSError:
        if not (final / META_FILE).is_file():
            raise
        shutil.rmtree(built)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks of ``HASH_CHUNK_BYTES`` (memory stays flat for any size)."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _file_problem(path: Path, record: Any, verify: bool) -> str | None:
    """How a cache file differs from its ``meta.json`` record (size, then sha256 if ``verify``), or None."""
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) \
            or not isinstance(record.get("sha256"), str):
        return f"{META_FILE} has no size and sha256 for {path.name}"
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path} has {size:,} bytes where {META_FILE} records {record['bytes']:,}"
    if verify and (digest := file_sha256(path)) != record["sha256"]:
        return f"{path} has sha256 {digest[:16]}..., {META_FILE} records {record['sha256'][:16]}..."
    return None


def check_cache_files(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The ``meta.json`` of a cache whose ``.bin`` files match what it records of them.

    Sizes are always compared (cheap); with ``verify`` the sha256 of every file too, which
    reads the whole cache. Sizes of all files are checked before any file is hashed.

    Raises:
        CacheError: naming each file that is missing or differs, or a ``meta.json`` that
            cannot be read.
    """
    meta = read_meta(directory)
    recorded = meta.get("files")
    recorded = recorded if isinstance(recorded, dict) else {}
    paths = [path for split in SPLITS for path in split_files(directory, split)]
    problems = [p for p in (_file_problem(path, recorded.get(path.name), verify=False) for path in paths) if p]
    if verify and not problems:
        problems = [p for p in (_file_problem(path, recorded[path.name], verify=True) for path in paths) if p]
    if problems:
        raise CacheError("; ".join(problems))
    return meta


def _discard(directory: Path) -> None:
    """Remove a corrupt cache; it is moved aside first, so no process ever sees it half deleted."""
    aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.corrupt.", dir=directory.parent))
    try:
        os.rename(directory, aside / directory.name)
    except FileNotFoundError:
        pass  # another process removed it first
    shutil.rmtree(aside)


def _reusable_meta(final: Path, verify: bool) -> dict[str, Any] | None:
    """The meta of the cache at ``final`` if it exists and its files check out; a corrupt one is removed."""
    if not (final / META_FILE).is_file():
        return None
    try:
        return check_cache_files(final, verify)
    except CacheError as error:
        logger.warning("the pretraining cache %s is corrupt, so it is removed and built again: %s", final, error)
        _discard(final)
        return None


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
    *,
    verify: bool = True,
) -> PretrainingCache:
    """Tokenize ``corpus`` into sentence-order instances cached on disk, or reuse the cache.

    Args:
        corpus: the documents (its files were checked when it was built).
        tokenizer: a tokenizer from :func:`load_tokenizer`, or its directory.
        cache_dir: parent directory of the caches (created if needed).
        config: instance settings; part of the cache key.
        num_proc: worker processes for tokenization (the result does not depend on it).
        verify: before reusing a cache, check the sha256 of every file against ``meta.json``
            (reads the whole cache once). With False only the sizes are checked: for the other
            ranks of a distributed job, once rank 0 has verified the cache. A cache that fails
            either check is removed and built again.

    Returns:
        The cache; ``.dataset("train")`` and ``.dataset("eval")`` read it.

    Raises:
        ConfigError: for bad ``config`` values or ``num_proc``.
        CorpusError: if the corpus holds no text, gives no training instance, or less than
            ``KEPT_SHARE_MINIMUM`` of its tokens would be kept (then no cache is written).
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
    meta = _reusable_meta(final, verify)
    if meta is not None:
        logger.info("reusing the pretraining cache %s (%s)", final, "sha256 verified" if verify else "sizes checked")
        _report_kept(meta["stats"], meta["splits"], config, corpus, refuse=False)
        return PretrainingCache(final, meta, reused=True)

    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    logger.info("preprocessing the corpus into %s with %d process(es)", final, num_proc)
    try:
        built = _build(corpus, tokenizer_json, config, num_proc, building)
        _check_built(corpus, built.splits, config)
        stats = _kept_stats(corpus, built)
        _report_kept(stats, built.splits, config, corpus, refuse=True)
        meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(config),
                "vocab_size": len(tokenizer), "corpus": fingerprint, "stats": stats, "splits": built.splits,
                "files": built.files}
        (building / META_FILE).write_text(json.dumps(meta, indent=2))
        _publish(building, final)
    finally:
        if building.exists():
            shutil.rmtree(building)
    return PretrainingCache(final, meta, reused=False)
