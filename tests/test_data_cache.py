"""Preprocessing into the on-disk cache: contents, reuse, invalidation, parallelism, errors."""

import numpy as np
import pytest
from data.english import DOCUMENTS
from data.helpers import make_tokenizer, write_book

from widenet_ds.config import ConfigError
from widenet_ds.data import (CacheError, Corpus, CorpusError, CorpusFormat, PreprocessConfig, PretrainingDataset,
                             create_instances, build_pretraining_cache)
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
