"""The data side of the pretraining job: from its command-line arguments to batches.

:func:`prepare_pretraining_data` (called by ``widenet_ds.jobs.pretrain.setup``):

1. picks the corpus: ``--train_files``, ``--dataset`` (a hub dataset), or by default the
   built-in corpus, the docstrings of Python's standard library (one document per module,
   written once to ``output_dir/data/stdlib_docstrings.jsonl``; works offline);
2. loads ``--tokenizer``, or the one trained into ``output_dir/tokenizer`` by an earlier run,
   or trains one there (``--vocab_size``, default 30000, 8000 for the built-in corpus);
3. builds or reuses the instance cache in ``output_dir/data_cache``;
4. returns :class:`PretrainingData`: the training sampler (whose state goes into checkpoints)
   and endless training batches, plus held-out evaluation batches.

Every problem a user can cause (missing files, bad settings) is reported before the tokenizer
is trained. In a distributed job rank 0 prepares while the other ranks wait, then they reuse
its files: ``output_dir`` must be on a filesystem every rank sees.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import os
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from ..config import ConfigError
from .cache import PreprocessConfig, PretrainingCache, build_pretraining_cache
from .corpus import LINE_DATASETS, Corpus, CorpusFormat, HubSource
from .dataset import PretrainingCollator, check_masking
from .loader import PretrainingLoader, make_pretraining_dataloader
from .sampler import ResumableDistributedSampler
from .tokenizer import load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 30_000
BUILTIN_VOCAB_SIZE = 8_000  # the built-in corpus (about 1.6 MB of text) is too small for 30000
_STDLIB_SKIP = frozenset({"test", "tests", "idlelib", "lib2to3", "ensurepip", "pydoc_data", "turtledemo",
                          "site-packages", "dist-packages"})  # tests, tools and bundled data, not prose
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
T = TypeVar("T")


@dataclass
class PretrainingData:
    """Tokenizer facts, the training sampler and the batches of one rank."""

    tokenizer_dir: Path  # holds the tokenizer the model is trained with (exported with the model)
    vocab_size: int
    pad_token_id: int
    cache: PretrainingCache
    collator: PretrainingCollator
    sampler: ResumableDistributedSampler  # of the training split; its state_dict() resumes exactly
    train_loader: PretrainingLoader
    micro_batch_size: int

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches without end: the rest of the sampler's epoch, then the next epochs."""
        while True:
            yield from self.train_loader
            self.sampler.set_epoch(self.sampler.epoch + 1)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's held-out batches, the same ones (same order, same masks) on every call."""
        loader, _ = make_pretraining_dataloader(self.cache.dataset("eval"), self.collator, self.micro_batch_size,
                                                shuffle=False)
        return iter(loader)


def _rank_zero_first(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0, then on the other ranks (which find its results on disk). If rank 0's
    work raises, every rank raises (``on_rank_zero``) instead of the others waiting for it forever."""
    from ..distributed import on_rank_zero

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    result = on_rank_zero(work, share_result=False)
    return result if dist.get_rank() == 0 else work()


def _module_docstrings(root: Path) -> Iterator[tuple[Path, str]]:
    """Each Python module under ``root`` with its docstrings (module, classes, functions) in source order."""
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts[:-1]) & _STDLIB_SKIP:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = sorted((n for n in ast.walk(tree) if isinstance(n, _DOCUMENTED)), key=lambda n: getattr(n, "lineno", 0))
        docstrings = [d for d in (ast.get_docstring(n) for n in nodes) if d]
        if docstrings:
            yield path, "\n\n".join(docstrings)


def write_stdlib_docstrings(directory: Path, root: Path | None = None) -> Path:
    """The built-in corpus: one JSON record per module of ``root`` (default: the standard library).

    Written once; later calls return the existing file, so its cache stays valid.
    """
    path = directory / "stdlib_docstrings.jsonl"
    if path.is_file():
        return path
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for module, text in _module_docstrings(root):
            handle.write(json.dumps({"module": str(module.relative_to(root)), "text": text}) + "\n")
    os.replace(partial, path)
    logger.info("wrote the built-in corpus (docstrings of %s) to %s", root, path)
    return path


def _corpus(args: argparse.Namespace, output_dir: Path) -> Corpus:
    """The corpus the arguments name (its files are checked here)."""
    if args.train_files and args.dataset:
        raise ConfigError("command line", ["give --train_files or --dataset, not both"])
    fmt = CorpusFormat(text_field=args.text_field)
    if args.dataset:
        records = "lines" if args.dataset in LINE_DATASETS else "documents"
        return Corpus(HubSource(args.dataset, args.dataset_config), dataclasses.replace(fmt, records=records))
    if args.train_files:
        return Corpus(args.train_files, fmt)
    return Corpus(_rank_zero_first(lambda: write_stdlib_docstrings(output_dir / "data")))


def _tokenizer(args: argparse.Namespace, corpus: Corpus, output_dir: Path) -> tuple[PreTrainedTokenizerBase, Path]:
    """``--tokenizer``, else the run's own tokenizer (trained on first use); with its directory."""
    if args.tokenizer:
        if args.vocab_size:
            logger.warning("--vocab_size is ignored: the tokenizer %s is used as it is", args.tokenizer)
        return load_tokenizer(args.tokenizer), Path(args.tokenizer)
    directory = output_dir / "tokenizer"
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(directory)
        if args.vocab_size and args.vocab_size != len(tokenizer):
            raise ConfigError("command line", [
                f"--vocab_size {args.vocab_size} differs from the {len(tokenizer)} tokens of the tokenizer this "
                f"run trained before ({directory}); drop --vocab_size, or use a new --output_dir"])
        logger.info("reusing the tokenizer in %s", directory)
        return tokenizer, directory
    default = DEFAULT_VOCAB_SIZE if args.train_files or args.dataset else BUILTIN_VOCAB_SIZE
    return train_tokenizer(corpus, directory, args.vocab_size or default), directory


def prepare_pretraining_data(args: argparse.Namespace, output_dir: str | Path,
                             micro_batch_size: int) -> PretrainingData:
    """Corpus, tokenizer, instance cache and loaders for the pretraining job (see the module docstring).

    ``args`` are the ``data`` and ``run`` arguments of ``widenet_ds.jobs.pretrain.build_parser``.

    Raises:
        ConfigError, CorpusError, TokenizerError: for anything the arguments get wrong, before
            the tokenizer is trained when possible.
    """
    output_dir = Path(output_dir)
    config = PreprocessConfig(max_seq_length=args.max_seq_length, short_seq_prob=args.short_seq_prob,
                              eval_fraction=args.eval_fraction, seed=args.seed)
    config.validate()
    check_masking(args.masked_lm_prob, args.max_ngram)
    corpus = _corpus(args, output_dir)
    tokenizer, tokenizer_dir = _rank_zero_first(lambda: _tokenizer(args, corpus, output_dir))
    verify = not dist.is_initialized() or dist.get_rank() == 0  # the other ranks reuse what rank 0 verified
    cache = _rank_zero_first(lambda: build_pretraining_cache(corpus, tokenizer, output_dir / "data_cache", config,
                                                             args.num_proc, verify=verify))
    # a compiled model gets one batch shape (a new length would compile again, and record another
    # CUDA graph): every batch padded to max_seq_length, as BERT's own pretraining data
    static = getattr(args, "compile", "none") != "none"
    collator = PretrainingCollator.from_tokenizer(tokenizer, seed=args.seed, mask_prob=args.masked_lm_prob,
                                                  max_ngram=args.max_ngram,
                                                  pad_to_length=args.max_seq_length if static else None)
    workers = getattr(args, "loader_workers", None)
    if workers is None:  # on a GPU, masking in the training process would leave the GPU waiting for each batch
        workers = 2 if torch.cuda.is_available() else 0
    loader, sampler = make_pretraining_dataloader(cache.dataset("train"), collator, micro_batch_size,
                                                  seed=args.seed, drop_last=True, num_workers=workers)
    if len(loader) == 0:
        raise ConfigError("data", [
            f"the training split has {len(cache.dataset('train'))} instances, less than one micro batch of "
            f"{micro_batch_size} on each of {sampler.num_replicas} rank(s); use more text or a smaller batch"])
    return PretrainingData(tokenizer_dir, len(tokenizer), tokenizer.pad_token_id, cache, collator, sampler, loader,
                           micro_batch_size)
