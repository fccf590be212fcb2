"""encode / collate with a WordPiece tokenizer trained on the fixture text (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from glue_fixtures import EXPECTED, tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from widenet_ds.glue import collate, encode, to_dataset


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    texts = [t for examples in EXPECTED.values() for e in examples for t in (e.text_a, e.text_b) if t]
    return tiny_tokenizer(texts)


def test_pairs_get_segment_ids_one_after_the_first_separator(tokenizer: PreTrainedTokenizerFast):
    examples = EXPECTED[("rte", "train")]
    features = encode(examples, tokenizer, max_length=64)
    assert [f["labels"] for f in features] == [1, 0]
    for feature, example in zip(features, examples):
        ids, types = feature["input_ids"], feature["token_type_ids"]
        first_sep = ids.index(tokenizer.sep_token_id)
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert ids.count(tokenizer.sep_token_id) == 2
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        assert ids[:first_sep + 1] == tokenizer(example.text_a)["input_ids"]  # segment A is text_a
        assert feature["attention_mask"] == [1] * len(ids)


def test_single_sentences_have_one_segment(tokenizer: PreTrainedTokenizerFast):
    features = encode(EXPECTED[("sst2", "train")], tokenizer, max_length=64)
    for feature in features:
        assert feature["input_ids"].count(tokenizer.sep_token_id) == 1
        assert set(feature["token_type_ids"]) == {0}
    assert [f["labels"] for f in features] == [1, 0]


def test_truncation_to_max_length(tokenizer: PreTrainedTokenizerFast):
    features = encode(EXPECTED[("qnli", "train")], tokenizer, max_length=8)
    assert [len(f["input_ids"]) for f in features] == [8, 8]
    assert all(f["input_ids"].count(tokenizer.sep_token_id) == 2 for f in features)


def test_test_examples_have_no_labels_and_datasets_encode_alike(tokenizer: PreTrainedTokenizerFast):
    examples = EXPECTED[("mnli", "test_mismatched")]
    features = encode(examples, tokenizer, max_length=32)
    assert all("labels" not in f for f in features)
    assert encode(to_dataset("mnli", examples), tokenizer, max_length=32) == features


def test_mixed_examples_are_refused(tokenizer: PreTrainedTokenizerFast):
    with pytest.raises(ValueError, match="one kind"):
        encode(EXPECTED[("rte", "train")] + EXPECTED[("rte", "test")], tokenizer, max_length=32)


def test_collate_pads_to_the_longest(tokenizer: PreTrainedTokenizerFast):
    features = encode(EXPECTED[("mrpc", "train")], tokenizer, max_length=128)
    lengths = [len(f["input_ids"]) for f in features]
    batch = collate(features, pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, max(lengths)) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert set(batch["input_ids"][short, min(lengths):].tolist()) == {tokenizer.pad_token_id}
    assert set(batch["token_type_ids"][short, min(lengths):].tolist()) == {0}
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.int64


def test_collate_scores_are_float_and_multiple_padding(tokenizer: PreTrainedTokenizerFast):
    batch = collate(encode(EXPECTED[("stsb", "train")], tokenizer, max_length=64),
                    pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=16)
    assert batch["input_ids"].shape[1] % 16 == 0
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([5.0, 3.8])


def test_collate_rounds_up_but_not_past_max_length(tokenizer: PreTrainedTokenizerFast):
    features = encode(EXPECTED[("mrpc", "train")], tokenizer, max_length=128)
    longest = max(len(f["input_ids"]) for f in features)
    assert 64 < longest < 127, "the case needs an example length between the two caps"
    pad = tokenizer.pad_token_id
    assert collate(features, pad, pad_to_multiple_of=64, max_length=512)["input_ids"].shape[1] == 128
    assert collate(features, pad, pad_to_multiple_of=64, max_length=longest + 1)["input_ids"].shape[1] == longest + 1
    assert collate(features, pad, pad_to_multiple_of=8, max_length=8)["input_ids"].shape[1] == longest  # no cut


def test_a_compiled_fine_tuning_pads_to_a_few_lengths(tokenizer: PreTrainedTokenizerFast):
    import argparse
    from types import SimpleNamespace

    from widenet_ds.jobs.finetune import batch_collator

    features = encode(EXPECTED[("mrpc", "train")], tokenizer, max_length=128)
    longest = max(len(f["input_ids"]) for f in features)
    for compiled, expected in (("none", longest), ("model:reduce-overhead", 128)):
        job = SimpleNamespace(args=argparse.Namespace(compile=compiled, max_seq_length=128), tokenizer=tokenizer)
        assert batch_collator(job)(features)["input_ids"].shape[1] == expected


def test_collate_needs_a_pad_token(tokenizer: PreTrainedTokenizerFast):
    with pytest.raises(ValueError, match="pad_token"):
        collate(encode(EXPECTED[("rte", "test")], tokenizer, max_length=16), pad_token_id=None)
