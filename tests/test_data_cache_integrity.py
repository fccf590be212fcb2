"""A damaged preprocessing cache is found, never trained on: sha256 records, rebuilds, dataset checks."""

import hashlib
import json
import logging

import numpy as np
import pytest
from data.helpers import make_tokenizer, write_book

from widenet_ds.data import (
    CacheError,
    Corpus,
    CorpusFormat,
    PreprocessConfig,
    PretrainingDataset,
    build_pretraining_cache,
)
from widenet_ds.data import cache as cache_module
from widenet_ds.data.dataset import META_FILE, SPLITS, split_files

CONFIG = PreprocessConfig(max_seq_length=48, eval_fraction=0.3, seed=7)
PARAGRAPHS = CorpusFormat(blank_lines_between_documents=1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def corpus(tmp_path):
    return Corpus([write_book(tmp_path / "text")], PARAGRAPHS)


@pytest.fixture
def cache(corpus, tokenizer, tmp_path):
    return build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)


def _bin_files(cache):
    return [path for split in SPLITS for path in split_files(cache.path, split)]


def _flip_a_bit(path, byte=5):
    data = bytearray(path.read_bytes())
    data[byte] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-4])


def test_meta_records_the_size_and_sha256_of_every_file(cache):
    files = _bin_files(cache)
    assert {f.name for f in files} == set(cache.meta["files"])
    for path in files:
        data = path.read_bytes()
        assert cache.meta["files"][path.name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((cache.path / META_FILE).read_text())["files"] == cache.meta["files"]


def test_file_sha256_reads_in_chunks_and_matches_hashlib(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "HASH_CHUNK_BYTES", 7)  # many chunks, the last one short
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 3)
    assert cache_module.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage, name, found", [
    (_truncate, "train.tokens.bin", "has {short:,} bytes where meta.json records {size:,}"),
    (_flip_a_bit, "train.tokens.bin", "has sha256"),
    (_flip_a_bit, "eval.index.bin", "has sha256"),
    (lambda path: path.unlink(), "train.index.bin", "is missing"),
])
def test_a_damaged_cache_is_removed_and_rebuilt(cache, corpus, tokenizer, tmp_path, caplog, damage, name, found):
    original = {path.name: path.read_bytes() for path in _bin_files(cache)}
    damage(cache.path / name)
    with caplog.at_level(logging.WARNING, logger="widenet_ds.data.cache"):
        again = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)
    assert not again.reused and again.path == cache.path
    warning = next(r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage())
    size = len(original.get(name, b""))
    assert f"{cache.path / name} {found.format(size=size, short=size - 4)}" in warning
    assert {path.name: path.read_bytes() for path in _bin_files(again)} == original
    assert again.meta == cache.meta
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.path.name]  # nothing left aside


def test_without_verify_only_sizes_are_checked(cache, corpus, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "file_sha256", lambda path: pytest.fail(f"{path} was hashed"))
    _flip_a_bit(cache.path / "train.tokens.bin")
    assert build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG, verify=False).reused
    _truncate(cache.path / "train.tokens.bin")
    rebuilt = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG, verify=False)
    assert not rebuilt.reused
    assert PretrainingDataset(rebuilt.path)[0]["tokens_a"].size > 0


@pytest.mark.parametrize("edit", [
    lambda meta: meta.pop("files"),  # written by code that recorded no hashes
    lambda meta: meta["files"]["eval.tokens.bin"].pop("sha256"),
])
def test_a_meta_without_file_records_is_rebuilt(cache, corpus, tokenizer, tmp_path, edit):
    meta = json.loads((cache.path / META_FILE).read_text())
    edit(meta)
    (cache.path / META_FILE).write_text(json.dumps(meta))
    again = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)
    assert not again.reused and again.meta == cache.meta


def test_a_damaged_meta_json_is_rebuilt(cache, corpus, tokenizer, tmp_path):
    (cache.path / META_FILE).write_text('{"format_version": 2, "spl')
    with pytest.raises(CacheError, match="meta.json is damaged .*delete .*build the cache again"):
        PretrainingDataset(cache.path)
    again = build_pretraining_cache(corpus, tokenizer, tmp_path / "cache", CONFIG)
    assert not again.reused and again.meta == cache.meta


@pytest.mark.parametrize("name", ["train.tokens.bin", "train.index.bin"])
def test_the_dataset_refuses_a_file_whose_size_disagrees_with_meta(cache, name):
    _truncate(cache.path / name)
    with pytest.raises(CacheError, match=f"{cache.path / name} has .* bytes, but meta.json counts .*truncated"):
        PretrainingDataset(cache.path, "train")
    assert len(PretrainingDataset(cache.path, "eval")) == cache.meta["splits"]["eval"]["instances"]


def test_the_dataset_refuses_an_index_whose_last_instance_overruns_the_tokens(cache):
    index_file = cache.path / "train.index.bin"
    rows = np.fromfile(index_file, dtype=np.int64).reshape(-1, 4)
    rows[-1, 2] += 1  # segment B one token longer: past the end of the token file
    rows.tofile(index_file)
    with pytest.raises(CacheError, match="train.index.bin: the last instance .* does not end where train.tokens.bin"):
        PretrainingDataset(cache.path, "train")


def test_the_dataset_refuses_a_missing_file(cache):
    (cache.path / "eval.tokens.bin").unlink()
    with pytest.raises(CacheError, match="eval.tokens.bin is missing from the cache; delete"):
        PretrainingDataset(cache.path, "eval")
