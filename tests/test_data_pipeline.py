"""The pretraining job's data entry point: arguments -> tokenizer, cache, batches."""

import argparse
import json

import pytest
import torch
from data.english import DOCUMENTS
from data.helpers import VOCAB_SIZE, fixture_documents, write_book

from widenet_ds.config import ConfigError
from widenet_ds.data import pipeline, prepare_pretraining_data, write_stdlib_docstrings


def _args(**changes):
    """The data arguments of the pretraining job, small enough for the fixture corpus."""
    values = dict(train_files=None, dataset=None, dataset_config=None, text_field="text", tokenizer=None,
                  vocab_size=VOCAB_SIZE, max_seq_length=48, short_seq_prob=0.1, masked_lm_prob=0.15, max_ngram=3,
                  eval_fraction=0.3, num_proc=1, seed=3)
    return argparse.Namespace(**{**values, **changes})


def _write_modules(root):
    """A fake standard library: each fixture document becomes a module with a documented function."""
    root.mkdir()
    for number, (first, second) in enumerate(DOCUMENTS):
        (root / f"module{number}.py").write_text(
            f"{' '.join(first)!r}\n\n\ndef run():\n    {' '.join(second)!r}\n", encoding="utf-8")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text('"""A test module, skipped."""\n')
    (root / "broken.py").write_text('"""Not Python at all.\n')
    return root


def test_files_give_a_tokenizer_a_cache_and_batches_which_later_runs_reuse(tmp_path, monkeypatch):
    args = _args(train_files=[str(write_book(tmp_path / "text"))])
    data = prepare_pretraining_data(args, tmp_path / "run", micro_batch_size=4)
    assert (data.vocab_size, data.pad_token_id, data.tokenizer_dir) == (VOCAB_SIZE, 0, tmp_path / "run" / "tokenizer")
    batch = next(data.train_batches())
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 48
    first_eval, second_eval = list(data.eval_batches()), list(data.eval_batches())
    assert first_eval and all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first_eval, second_eval))

    monkeypatch.setattr(pipeline, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer trained again"))
    again = prepare_pretraining_data(args, tmp_path / "run", micro_batch_size=4)
    assert again.cache.reused and again.cache.path == data.cache.path


def test_a_compiled_run_gets_every_batch_at_max_seq_length(tmp_path):
    """One shape for a compiled model (no recompiles, one CUDA graph); eager runs pad to the longest."""
    book = [str(write_book(tmp_path / "text"))]
    settings = dict(train_files=book, max_seq_length=128, short_seq_prob=0.5)
    eager = prepare_pretraining_data(_args(**settings), tmp_path / "run", 2)
    compiled = prepare_pretraining_data(_args(**settings, compile="model:reduce-overhead"), tmp_path / "run", 2)
    lengths = {kind: {b["input_ids"].shape[1] for b in [*data.train_loader, *data.eval_batches()]}
               for kind, data in (("eager", eager), ("compiled", compiled))}
    assert lengths["compiled"] == {128}
    assert min(lengths["eager"]) < 128, "the fixture has batches shorter than max_seq_length"


def test_train_batches_run_on_into_the_next_epoch(tmp_path):
    data = prepare_pretraining_data(_args(train_files=[str(write_book(tmp_path))]), tmp_path / "run", 4)
    batches = data.train_batches()
    for _ in range(len(data.train_loader) + 1):
        next(batches)
    assert data.sampler.epoch == 1 and data.sampler.position == 4


def test_builtin_corpus_is_module_docstrings_in_source_order(tmp_path):
    path = write_stdlib_docstrings(tmp_path / "data", root=_write_modules(tmp_path / "lib"))
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["module"] for r in records] == [f"module{n}.py" for n in range(len(DOCUMENTS))]
    assert [r["text"].split("\n\n") for r in records] == [[" ".join(p) for p in d] for d in DOCUMENTS]
    assert write_stdlib_docstrings(tmp_path / "data", root=tmp_path / "elsewhere") == path  # written once


def test_without_files_the_builtin_corpus_is_used(tmp_path, monkeypatch):
    lib = _write_modules(tmp_path / "lib")
    monkeypatch.setattr(pipeline.sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    data = prepare_pretraining_data(_args(), tmp_path / "run", micro_batch_size=4)
    assert data.cache.meta["stats"]["documents"] == len(DOCUMENTS)
    assert data.cache.meta["stats"]["sentences"] == sum(len(d) for d in fixture_documents())


def test_bad_arguments_fail_before_the_tokenizer_is_trained(tmp_path):
    book = str(write_book(tmp_path))
    with pytest.raises(ConfigError, match="--train_files or --dataset, not both"):
        prepare_pretraining_data(_args(train_files=[book], dataset="wikitext"), tmp_path / "run", 4)
    with pytest.raises(ConfigError, match="mask_prob must be in"):
        prepare_pretraining_data(_args(train_files=[book], masked_lm_prob=1.5), tmp_path / "run", 4)
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_a_batch_larger_than_the_training_split_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="less than one micro batch of 1000"):
        prepare_pretraining_data(_args(train_files=[str(write_book(tmp_path))]), tmp_path / "run", 1000)


def test_a_vocab_size_other_than_the_runs_tokenizer_is_refused(tmp_path):
    args = _args(train_files=[str(write_book(tmp_path))])
    prepare_pretraining_data(args, tmp_path / "run", 4)
    with pytest.raises(ConfigError, match="--vocab_size 200 differs from the 300 tokens"):
        prepare_pretraining_data(_args(train_files=args.train_files, vocab_size=200), tmp_path / "run", 4)
