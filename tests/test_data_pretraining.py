"""Sentence-order instances and n-gram masking, checked against their definitions on real text."""

import numpy as np
import pytest
from data.helpers import fixture_documents, make_tokenizer

from widenet_ds.data import (
    IGNORE_INDEX,
    PretrainingCollator,
    create_instances,
    mask_tokens,
    select_masked_spans,
)
from widenet_ds.data.pretraining import ngram_probabilities, num_to_predict


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def documents(tokenizer):
    """The fixture documents as token ids per sentence."""
    return [[tokenizer(s, add_special_tokens=False)["input_ids"] for s in d] for d in fixture_documents()]


@pytest.fixture(scope="module")
def collator(tokenizer):
    return PretrainingCollator.from_tokenizer(tokenizer)


def _instances(documents, max_seq_length, short_seq_prob=0.1, repeats=40):
    """Instances of every document, created ``repeats`` times with different seeds."""
    return [instance for seed in range(repeats) for number, document in enumerate(documents)
            for instance in create_instances(document, max_seq_length, short_seq_prob,
                                             rng=np.random.default_rng([seed, number]))]


def _position_coded(documents):
    """Documents with the real sentence lengths whose token ids are their positions in the corpus."""
    coded, position = [], 0
    for document in documents:
        coded.append([])
        for sentence in document:
            coded[-1].append(list(range(position, position + len(sentence))))
            position += len(sentence)
    return coded


@pytest.mark.parametrize("max_seq_length", [8, 24, 64, 512])
def test_instances_fit_the_sequence_and_have_two_segments(documents, max_seq_length):
    instances = _instances(documents, max_seq_length, repeats=10)
    assert instances
    assert all(len(i.tokens_a) + len(i.tokens_b) + 3 <= max_seq_length for i in instances)
    assert all(i.tokens_a and i.tokens_b for i in instances)


def test_sentence_order_labels_are_balanced(documents):
    labels = [i.sop_label for i in _instances(documents, 64, repeats=100)]
    assert len(labels) > 1000
    assert abs(np.mean(labels) - 0.5) < 0.05


@pytest.mark.parametrize("max_seq_length", [24, 64, 512])
def test_segments_are_contiguous_spans_of_one_document_and_swapped_ones_are_reversed(documents, max_seq_length):
    coded = _position_coded(documents)
    for number, document in enumerate(coded):
        first, last = document[0][0], document[-1][-1]
        for seed in range(20):
            for instance in create_instances(document, max_seq_length, rng=np.random.default_rng([seed, number])):
                a, b = np.array(instance.tokens_a), np.array(instance.tokens_b)
                assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()
                assert first <= min(a[0], b[0]) and max(a[-1], b[-1]) <= last
                if instance.sop_label == 1:
                    assert b[-1] < a[0]
                else:
                    assert a[-1] < b[0]


def test_without_truncation_a_and_b_split_a_document_at_a_sentence_boundary(documents):
    coded = _position_coded(documents)
    starts = {s[0] for d in coded for s in d}
    for number, document in enumerate(coded):
        (instance,) = create_instances(document, 1024, 0.0, rng=np.random.default_rng(number))
        first, second = sorted([instance.tokens_a, instance.tokens_b])
        assert first + second == [t for s in document for t in s]
        assert second[0] in starts


def test_instances_fill_the_sequence_unless_short_or_last(documents):
    for number, document in enumerate(documents):
        instances = create_instances(document, 32, 0.0, rng=np.random.default_rng(number))
        assert len(instances) > 1
        assert all(len(i.tokens_a) + len(i.tokens_b) == 29 for i in instances[:-1])


def test_short_seq_prob_shortens_instances(documents):
    def mean_length(prob):
        return np.mean([len(i.tokens_a) + len(i.tokens_b) for i in _instances(documents, 128, prob, repeats=10)])
    assert mean_length(1.0) < 0.75 * mean_length(0.0)


def test_a_single_sentence_is_split_inside_its_document():
    (instance,) = create_instances([[11, 12, 13, 14, 15]], 512, rng=np.random.default_rng(0))
    assert sorted(instance.tokens_a + instance.tokens_b) == [11, 12, 13, 14, 15]
    assert create_instances([[11]], 512, rng=np.random.default_rng(0)) == []


def test_instances_are_a_function_of_the_rng_seed(documents):
    assert _instances(documents, 64, repeats=2) == _instances(documents, 64, repeats=2)


@pytest.fixture(scope="module")
def masked(documents, collator):
    """(original, special mask, masked ids, labels) of many real sequences."""
    out = []
    for index, instance in enumerate(_instances(documents, 128, repeats=100)):
        ids, _, special = collator.assemble(np.array(instance.tokens_a), np.array(instance.tokens_b))
        masked_ids, labels = mask_tokens(ids, special, collator.vocab_size, collator.mask_token_id,
                                         np.random.default_rng(index))
        out.append((ids, special, masked_ids, labels))
    return out


def test_each_sequence_predicts_its_budget_and_the_rate_is_fifteen_percent(masked):
    predicted = [int((labels != IGNORE_INDEX).sum()) for _, _, _, labels in masked]
    lengths = [len(ids) for ids, _, _, _ in masked]
    assert predicted == [num_to_predict(n, 0.15, None) for n in lengths]
    assert abs(sum(predicted) / sum(lengths) - 0.15) < 0.01


def test_special_tokens_are_never_masked_and_labels_hold_the_original_ids(masked):
    for ids, special, masked_ids, labels in masked:
        chosen = labels != IGNORE_INDEX
        assert not (chosen & special).any()
        assert (labels[chosen] == ids[chosen]).all()
        assert (masked_ids[~chosen] == ids[~chosen]).all()


def test_chosen_tokens_are_80_percent_mask_10_random_10_unchanged(masked, collator):
    replaced = np.concatenate([m[labels != IGNORE_INDEX] for _, _, m, labels in masked])
    original = np.concatenate([ids[labels != IGNORE_INDEX] for ids, _, _, labels in masked])
    assert len(replaced) > 5000
    as_mask = np.mean(replaced == collator.mask_token_id)
    unchanged = np.mean(replaced == original)
    assert abs(as_mask - 0.8) < 0.02
    assert abs(unchanged - 0.1) < 0.015
    assert abs(1 - as_mask - unchanged - 0.1) < 0.015


def test_ngram_lengths_follow_one_over_n(masked):
    counts = np.zeros(4)
    for seed, (ids, special, _, _) in enumerate(masked):
        budget, used = num_to_predict(len(ids), 0.15, None), 0
        for span in select_masked_spans(special, np.random.default_rng(seed)):
            if budget - used >= 3:  # the budget cuts the last n-grams short; count the others
                counts[len(span)] += 1
            used += len(span)
    assert counts.sum() > 10_000
    assert np.allclose(counts[1:] / counts.sum(), ngram_probabilities(3), atol=0.02)
    assert np.allclose(ngram_probabilities(3), np.array([6, 3, 2]) / 11)


@pytest.mark.parametrize("specials, mask_prob", [([0, 7, 8, 20, 39], 0.3), (list(range(0, 40, 3)), 0.6)])
def test_ngrams_never_cross_special_tokens_nor_overlap_and_fill_the_budget(specials, mask_prob):
    special = np.zeros(40, dtype=bool)
    special[specials] = True
    for seed in range(200):
        spans = select_masked_spans(special, np.random.default_rng(seed), mask_prob=mask_prob)
        positions = [p for span in spans for p in span]
        assert len(positions) == len(set(positions)) == num_to_predict(40, mask_prob, None)
        assert not special[positions].any()


def test_max_predictions_and_max_ngram_are_respected():
    special = np.zeros(200, dtype=bool)
    special[[0, 199]] = True
    rng = np.random.default_rng(0)
    assert sum(len(s) for s in select_masked_spans(special, rng, max_predictions=5)) == 5
    assert {len(s) for s in select_masked_spans(special, rng, max_ngram=1)} == {1}
