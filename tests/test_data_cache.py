"""Preprocessing into the on-disk cache: contents, reuse, invalidation, parallelism, errors."""

import json
import logging

import numpy as np
import pytest
from data.english import DOCUMENTS
from data.helpers import make_tokenizer, write_book

from widenet_ds.config import ConfigError
from widenet_ds.data import (
    CacheError,
    Corpus,
    CorpusError,
    CorpusFormat,
    PreprocessConfig,
    PretrainingDataset,
    build_pretraining_cache,
    create_instances,
)
from widenet_ds.data import cache as cache_module
from widenet_ds.data.dataset import split_files

CONFIG = PreprocessConfig(max_seq_length=48, eval_fraction=0.3, seed=7)
PARAGRAPHS = CorpusFormat(blank_lines_between_documents=1)  # one document per paragraph: 13 documents


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def corpus(tmp_path):
    return Corpus([write_book(tmp_path / "text")], PARAGRAPHS)


def _items(dataset):
    """(tokens_a, tokens_b, sop_label) of every instance, as lists."""
    examples = (dataset[i] for i in range(len(dataset)))
    return [(e["tokens_a"].tolist(), e["tokens_b"].tolist(), e["sop_label"]) for e in examples]


def _contains(stream, segment):
    """Whether ``segment`` occurs in ``stream`` as a contiguous run."""
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(stream), len(segment))
    return bool((windows == np.asarray(segment)).all(axis=1).any())


def test_cache_holds_the_instances_of_each_document_in_its_split(corpus, tokenizer, tmp_path):
    cache = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)
    expected = {"train": [], "eval": []}
    for number, document in enumerate(corpus):
        rng = np.random.default_rng([CONFIG.seed, number])
        split = "eval" if rng.random() < CONFIG.eval_fraction else "train"
        tokenized = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in document]
        expected[split] += [(i.tokens_a, i.tokens_b, i.sop_label)
                            for i in create_instances(tokenized, CONFIG.max_seq_length, CONFIG.short_seq_prob, rng=rng)]
    assert expected["train"] and expected["eval"]
    assert _items(cache.dataset("train")) == expected["train"]
    assert _items(cache.dataset("eval")) == expected["eval"]
    assert cache.meta["splits"]["eval"]["instances"] == len(expected["eval"])
    assert cache.meta["stats"]["documents"] == sum(len(d) for d in DOCUMENTS)


def test_both_segments_of_every_instance_come_from_one_document(corpus, tokenizer, tmp_path):
    cache = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)
    streams = [[t for s in d for t in tokenizer(s, add_special_tokens=False)["input_ids"]] for d in corpus]
    for split in ("train", "eval"):
        for a, b, _ in _items(cache.dataset(split)):
            assert any(_contains(stream, a) and _contains(stream, b) for stream in streams)
            assert len(a) + len(b) + 3 <= CONFIG.max_seq_length


def test_second_call_reuses_the_cache_without_tokenizing(corpus, tokenizer, tmp_path, monkeypatch):
    first = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)

    def fail(*args):
        raise AssertionError("the corpus was tokenized again")

    monkeypatch.setattr(cache_module._ChunkWorker, "__call__", fail)
    second = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)
    assert (first.reused, second.reused) == (False, True)
    assert second.path == first.path and second.meta == first.meta
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]


def test_a_changed_source_file_or_setting_gives_a_new_cache(corpus, tokenizer, tmp_path):
    first = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)
    other = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", PreprocessConfig(max_seq_length=64))
    with open(corpus.files[0], "a", encoding="utf-8") as handle:
        handle.write("\nThe market reopened the next week, and prices slowly returned to normal.\n")
    changed = build_pretraining_cache(Corpus(corpus.files, PARAGRAPHS), tokenizer, tmp_path / "cache", CONFIG)
    assert not other.reused and not changed.reused
    assert len({first.path, other.path, changed.path}) == 3
    assert changed.meta["stats"]["documents"] == first.meta["stats"]["documents"] + 1


def test_tokenizer_directory_is_accepted_in_place_of_the_tokenizer(corpus, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    first = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)
    again = build_pretraining_cache(corpus, str(tmp_path / "tokenizer"), tmp_path / "cache", CONFIG)
    assert again.reused and again.path == first.path


def test_worker_processes_write_the_same_cache(corpus, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "DOCUMENTS_PER_TASK", 2)  # several tasks per worker
    inline = build_pretraining_cache(corpus, tokenizer, tmp_path / "one", CONFIG, num_proc=1)
    pooled = build_pretraining_cache(corpus, tokenizer, tmp_path / "two", CONFIG, num_proc=2)
    for split in ("train", "eval"):
        for inline_file, pooled_file in zip(split_files(inline.path, split), split_files(pooled.path, split)):
            assert inline_file.read_bytes() == pooled_file.read_bytes()
    assert inline.meta["splits"] == pooled.meta["splits"]
    assert inline.meta["files"] == pooled.meta["files"]  # sha256 of what each writer hashed as it wrote
    assert inline.meta["stats"] == pooled.meta["stats"]


def test_a_corpus_without_text_is_an_error_and_leaves_no_cache(tokenizer, tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("   \n\n\t\n")
    with pytest.raises(CorpusError, match="no text in the corpus"):
        build_pretraining_cache(Corpus([path]), tokenizer, tmp_path / "cache", CONFIG)
    assert list((tmp_path / "cache").iterdir()) == []


def test_bad_settings_are_reported_together(corpus, tokenizer, tmp_path):
    with pytest.raises(ConfigError) as error:
        build_pretraining_cache(corpus, tokenizer, tmp_path,
                                 PreprocessConfig(max_seq_length=4, short_seq_prob=1.5, eval_fraction=-0.1))
    assert len(error.value.problems) == 3
    with pytest.raises(ConfigError, match="num_proc"):
        build_pretraining_cache(corpus, tokenizer, tmp_path, CONFIG, num_proc=0)


def test_dataset_errors_name_the_directory_and_the_fix(corpus, tokenizer, tmp_path):
    with pytest.raises(CacheError, match="not a pretraining cache .*build_pretraining_cache"):
        PretrainingDataset(tmp_path)
    dataset = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG).dataset()
    assert dataset[-1]["index"] == len(dataset) - 1
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def _unpunctuated_lines(count, seed=0):
    """Lines of fixture words without any sentence punctuation, as code, lists or lyrics come."""
    words = sorted({w.strip(".,!?\"'").lower() for d in DOCUMENTS for p in d for s in p for w in s.split()})
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=10)) for _ in range(count)]


def test_the_build_reports_what_was_read_and_what_was_kept(corpus, tokenizer, tmp_path, caplog):
    config = PreprocessConfig(max_seq_length=128, eval_fraction=0.3, seed=7)
    with caplog.at_level(logging.INFO, logger="widenet_ds.data.cache"):
        cache = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", config)
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for d in corpus for s in d]
    kept = [len(a) + len(b) for split in ("train", "eval") for a, b, _ in _items(cache.dataset(split))]
    stats = cache.meta["stats"]
    assert (stats["documents"], stats["sentences"]) == (len(list(corpus)), len(lengths))
    assert stats["tokens_read"] == sum(lengths)
    assert stats["long_sentences"] == sum(n > config.max_seq_length - 3 for n in lengths)
    assert (stats["instances_kept"], stats["tokens_kept"]) == (len(kept), sum(kept))
    assert stats["kept_share"] == pytest.approx(sum(kept) / sum(lengths))
    assert 0.9 < stats["kept_share"] < 1  # the sentence that overflows an instance loses a few tokens
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("read ")]
    assert summary == [f"read {len(list(corpus))} documents, {len(lengths)} sentences, {sum(lengths):,} tokens; "
                       f"kept {sum(kept):,} tokens ({sum(kept) / sum(lengths):.1%}) in "
                       f"{len(cache.dataset('train'))} train and {len(cache.dataset('eval'))} eval instances; "
                       f"0 sentences longer than 125 tokens were truncated; 0 lines skipped"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_keeping_less_than_80_percent_warns_why(corpus, tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="widenet_ds.data.cache"):
        cache = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)
    stats = cache.meta["stats"]
    assert cache_module.KEPT_SHARE_MINIMUM < stats["kept_share"] < cache_module.KEPT_SHARE_WARNING
    assert (f"only {stats['kept_share']:.1%} of the {stats['tokens_read']:,} tokens read were kept in the "
            f"pretraining cache: an instance holds at most 45 tokens (max_seq_length 48 - 3)") in caplog.text
    assert caplog.text.rstrip().endswith("raise max_seq_length")


@pytest.mark.parametrize("name, fix", [
    ("lines.txt", "put each line in its own record of a .jsonl file"),
    ("records.jsonl", "inside a record, a line break is read as a space"),
])
def test_unpunctuated_text_that_would_be_mostly_dropped_is_refused(tokenizer, tmp_path, name, fix):
    lines = _unpunctuated_lines(400)
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps({"text": "\n".join(lines[i:i + 100])}) + "\n" for i in range(0, 400, 100)))
    else:
        path.write_text("\n".join(lines))
    corpus = Corpus([path])
    sentences = [s for d in corpus for s in d]
    tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences)
    config = PreprocessConfig(max_seq_length=128)
    with pytest.raises(CorpusError) as error:
        build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", config)
    message = str(error.value)
    assert f"of the {tokens:,} tokens read were kept (less than 10%, so no cache was written)" in message
    assert (f"{len(sentences)} of {len(sentences)} sentences are longer than max_seq_length 128 (more than 125 "
            f"tokens) and are truncated to it") in message
    assert "ends with sentence punctuation (. ! ?)" in message and fix in message
    assert list((tmp_path / "cache").iterdir()) == []
