"""The resumable distributed sampler, dynamic masking in the collator, and the DataLoader helper."""

import dataclasses

import numpy as np
import pytest
import torch
from data.helpers import make_tokenizer, write_book

from widenet_ds.data import (
    IGNORE_INDEX,
    Corpus,
    PreprocessConfig,
    PretrainingCollator,
    ResumableDistributedSampler,
    build_pretraining_cache,
    make_pretraining_dataloader,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def dataset(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    config = PreprocessConfig(max_seq_length=40, eval_fraction=0.0)
    return build_pretraining_cache(Corpus([write_book(root)]), tokenizer, root / "cache", config).dataset()


@pytest.fixture(scope="module")
def collator(tokenizer):
    return PretrainingCollator.from_tokenizer(tokenizer, seed=5)


def _shards(num_examples, world, **options):
    return [[i for _, i in ResumableDistributedSampler(num_examples, num_replicas=world, rank=r, **options)]
            for r in range(world)]


def _batches(loader):
    return [{name: tensor.clone() for name, tensor in batch.items()} for batch in loader]


def _same(first, second):
    return len(first) == len(second) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(first, second))


# ---------------------------------------------------------------------------------------------
# Sampler


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_equal_and_cover_the_dataset(world):
    shards = _shards(12, world, seed=3)
    assert len({len(s) for s in shards}) == 1
    assert sorted(i for s in shards for i in s) == list(range(12))


def test_uneven_datasets_are_padded_or_cut_to_equal_shards():
    padded = _shards(10, 4, seed=3)
    assert [len(s) for s in padded] == [3, 3, 3, 3] and set().union(*padded) == set(range(10))
    cut = _shards(10, 4, seed=3, drop_last=True)
    flat = [i for s in cut for i in s]
    assert [len(s) for s in cut] == [2, 2, 2, 2] and len(set(flat)) == len(flat) == 8


def test_order_is_a_function_of_seed_and_epoch():
    def order(seed, epoch):
        sampler = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert all(epoch == 4 for epoch, _ in order(1, 4))
    assert [i for _, i in ResumableDistributedSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("consumed", [0, 1, 4, 6, 7])
def test_resume_yields_exactly_the_remaining_indices(consumed):
    for rank in range(3):
        sampler = ResumableDistributedSampler(20, num_replicas=3, rank=rank, seed=9)
        sampler.set_epoch(2)
        full = list(sampler)
        sampler.advance(consumed)
        resumed = ResumableDistributedSampler(20, num_replicas=3, rank=rank, seed=9)
        resumed.load_state_dict(sampler.state_dict())
        resumed.set_epoch(2)  # a training loop does this at the top of the epoch: the position stays
        assert list(resumed) == full[consumed:]
        assert len(resumed) == len(full) - consumed


def test_resume_on_another_number_of_ranks_covers_the_rest_of_the_epoch():
    before = ResumableDistributedSampler(24, num_replicas=4, rank=0, seed=1)
    order = before.epoch_order(0)
    before.advance(3)  # every one of the 4 ranks consumed 3 examples: 12 global positions
    shards = []
    for rank in range(2):
        after = ResumableDistributedSampler(24, num_replicas=2, rank=rank, seed=1)
        after.load_state_dict(before.state_dict())
        shards.append([i for _, i in after])
    assert sorted(shards[0] + shards[1]) == sorted(order[12:].tolist())


def test_resuming_with_another_seed_or_dataset_is_refused():
    state = ResumableDistributedSampler(20, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed: checkpoint 1, now 2.*num_examples: checkpoint 20, now 21"):
        ResumableDistributedSampler(21, seed=2).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Collator


def test_assembly_matches_the_tokenizer_pair_encoding(tokenizer, collator):
    a, b = "The keeper climbed the steps.", "Supplies arrived by boat."
    ids_a = np.array(tokenizer(a, add_special_tokens=False)["input_ids"])
    ids_b = np.array(tokenizer(b, add_special_tokens=False)["input_ids"])
    input_ids, token_type_ids, special = collator.assemble(ids_a, ids_b)
    reference = tokenizer(a, b, return_special_tokens_mask=True)
    assert input_ids.tolist() == reference["input_ids"]
    assert token_type_ids.tolist() == reference["token_type_ids"]
    assert special.astype(int).tolist() == reference["special_tokens_mask"]


def test_batch_layout_padding_and_labels(dataset, collator):
    examples = [dataset[i] for i in range(6)]
    batch = collator(examples)
    lengths = [len(e["tokens_a"]) + len(e["tokens_b"]) + 3 for e in examples]
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].shape == (6, max(lengths))
    assert batch["sentence_order_label"].tolist() == [e["sop_label"] for e in examples]
    for row, (example, length) in enumerate(zip(examples, lengths)):
        first_b = len(example["tokens_a"]) + 2
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert batch["token_type_ids"][row].tolist() == [0] * first_b + [1] * (length - first_b) + [0] * (
            max(lengths) - length)
        assert (batch["input_ids"][row, length:] == collator.pad_token_id).all()
        assert batch["input_ids"][row, [0, first_b - 1, length - 1]].tolist() == [
            collator.cls_token_id, collator.sep_token_id, collator.sep_token_id]
        labels = batch["labels"][row]
        assert (labels[[0, first_b - 1]] == IGNORE_INDEX).all() and (labels[length - 1:] == IGNORE_INDEX).all()
        assert (labels != IGNORE_INDEX).any()


@pytest.mark.parametrize("pad_to_length, max_predictions", [(None, None), (40, None), (40, 3)])
def test_mlm_positions_list_every_labelled_position_within_a_static_bound(dataset, collator, pad_to_length,
                                                                         max_predictions):
    collator = dataclasses.replace(collator, pad_to_length=pad_to_length, max_predictions=max_predictions)
    batch = collator([dataset[i] for i in range(8)])
    length = batch["labels"].shape[1]
    bound = min(max(1, round(0.15 * length)), max_predictions or length)
    assert batch["mlm_positions"].shape == (8, bound)
    for labels, positions in zip(batch["labels"], batch["mlm_positions"]):
        labelled = torch.nonzero(labels != IGNORE_INDEX).flatten()
        assert positions[:len(labelled)].tolist() == labelled.tolist()
        assert (positions[len(labelled):] == -1).all()


def test_fixed_length_padding(dataset, collator):
    fixed = dataclasses.replace(collator, pad_to_length=40)
    assert fixed([dataset[0], dataset[1]])["input_ids"].shape == (2, 40)
    short = dataclasses.replace(collator, pad_to_length=5)
    with pytest.raises(ValueError, match="pad_to_length=5 is shorter"):
        short([dataset[0]])


def test_masks_depend_on_seed_epoch_and_index_only(dataset, collator):
    alone = collator([dataset[(0, 3)]])
    length = alone["input_ids"].shape[1]
    in_a_batch = collator([dataset[(0, 7)], dataset[(0, 3)]])
    assert torch.equal(in_a_batch["input_ids"][1, :length], alone["input_ids"][0])
    assert torch.equal(in_a_batch["labels"][1, :length], alone["labels"][0])
    assert not torch.equal(collator([dataset[(1, 3)]])["labels"], alone["labels"])
    reseeded = dataclasses.replace(collator, seed=collator.seed + 1)
    assert not torch.equal(reseeded([dataset[(0, 3)]])["labels"], alone["labels"])


# ---------------------------------------------------------------------------------------------
# DataLoader


def test_batches_do_not_depend_on_the_number_of_workers(dataset, collator):
    inline, _ = make_pretraining_dataloader(dataset, collator, 4, seed=2)
    workers, _ = make_pretraining_dataloader(dataset, collator, 4, seed=2, num_workers=2)
    assert _same(_batches(inline), _batches(workers))


def test_resumed_loader_gives_exactly_the_remaining_batches(dataset, collator):
    loader, sampler = make_pretraining_dataloader(dataset, collator, 3, seed=2, num_workers=2)
    uninterrupted = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        uninterrupted += _batches(loader)

    loader, sampler = make_pretraining_dataloader(dataset, collator, 3, seed=2, num_workers=2)
    seen = []
    for batch in loader:  # the workers prefetch ahead; the state must count delivered batches only
        seen.append({name: tensor.clone() for name, tensor in batch.items()})
        if len(seen) == 4:
            break
    state = sampler.state_dict()

    loader, sampler = make_pretraining_dataloader(dataset, collator, 3, seed=2)
    sampler.load_state_dict(state)
    for epoch in range(sampler.epoch, 2):
        sampler.set_epoch(epoch)
        seen += _batches(loader)
    assert state["position"] == 12
    assert _same(seen, uninterrupted)

