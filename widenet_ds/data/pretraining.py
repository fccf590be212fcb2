"""ALBERT pretraining examples: sentence-order pairs and n-gram masking.

Follows google-research/albert ``create_pretraining_data.py`` (``create_instances_from_document``
and ``create_masked_lm_predictions`` with sentence-order prediction and n-gram masking), with
three deliberate differences, each noted where it happens:

- both segments always come from the one document (ALBERT borrows segment B from a random
  document when a chunk holds a single sentence; here that sentence is split in two);
- the short target length is drawn for each instance, not once per document;
- an n-gram's length is drawn before its place, so lengths follow ``p(n) ∝ 1/n`` (see
  :func:`select_masked_spans`); an n-gram never spans a special token; all randomness comes
  from the ``rng`` argument (ALBERT draws n-gram lengths from numpy's global RNG).

Token ids are plain ints; ``rng`` is a ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100  # label of positions that are not predicted (torch's cross-entropy default)
MASK_PROB_MASK = 0.8  # share of chosen tokens replaced by [MASK]
MASK_PROB_RANDOM = 0.1  # share replaced by a random token; the remaining 0.1 keep their token


@dataclass(frozen=True)
class Instance:
    """One sentence-order example: ``[CLS] tokens_a [SEP] tokens_b [SEP]`` once assembled."""

    tokens_a: list[int]  # first segment, without special tokens
    tokens_b: list[int]  # second segment, without special tokens
    sop_label: int  # 1: the segments are swapped (B precedes A in the document); 0: document order


def _truncate_pair(a: list[int], b: list[int], max_tokens: int,
                   rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Trim the longer segment, one token at a time from a random end, until both fit in ``max_tokens``."""
    a_start, a_end, b_start, b_end = 0, len(a), 0, len(b)
    while (a_end - a_start) + (b_end - b_start) > max_tokens:
        from_front = rng.random() < 0.5
        if a_end - a_start > b_end - b_start:
            a_start, a_end = (a_start + 1, a_end) if from_front else (a_start, a_end - 1)
        else:
            b_start, b_end = (b_start + 1, b_end) if from_front else (b_start, b_end - 1)
    return a[a_start:a_end], b[b_start:b_end]


def _instance_from_chunk(chunk: list[list[int]], max_tokens: int, rng: np.random.Generator) -> Instance | None:
    """Split contiguous sentences into segments A and B, swap them half the time, truncate."""
    if len(chunk) >= 2:
        a_end = int(rng.integers(1, len(chunk)))  # sentences chunk[:a_end] form A
        a = [t for sentence in chunk[:a_end] for t in sentence]
        b = [t for sentence in chunk[a_end:] for t in sentence]
    elif len(chunk[0]) >= 2:  # ALBERT takes B from another document here
        cut = int(rng.integers(1, len(chunk[0])))
        a, b = chunk[0][:cut], chunk[0][cut:]
    else:
        return None
    swapped = rng.random() < 0.5
    if swapped:
        a, b = b, a
    a, b = _truncate_pair(a, b, max_tokens, rng)
    return Instance(a, b, int(swapped))


def _target_length(max_tokens: int, short_seq_prob: float, rng: np.random.Generator) -> int:
    """Usually ``max_tokens``; with probability ``short_seq_prob`` a uniform length in [2, max_tokens]."""
    if rng.random() < short_seq_prob:
        return int(rng.integers(2, max_tokens, endpoint=True))
    return max_tokens


def create_instances(document: list[list[int]], max_seq_length: int = 512, short_seq_prob: float = 0.1, *,
                     rng: np.random.Generator) -> list[Instance]:
    """Sentence-order prediction instances from one tokenized document.

    Sentences are gathered into a chunk until it reaches the target length (or the document
    ends); the chunk is split at a random sentence boundary into A and B; half the time the
    two are swapped (``sop_label=1``); the longer one is trimmed until
    ``len(A) + len(B) <= max_seq_length - 3`` (room for ``[CLS]``, ``[SEP]``, ``[SEP]``).

    Args:
        document: the token ids of each sentence of one document, in order.
        max_seq_length: hard limit on the assembled length, special tokens included.
        short_seq_prob: chance that an instance aims at a random length in ``[2, max_seq_length - 3]``
            instead of filling the sequence, to match shorter fine-tuning inputs.
        rng: the source of every random choice.

    Returns:
        The instances, in document order. A document with fewer than two tokens gives none.
    """
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length must be >= 5 ([CLS] a [SEP] b [SEP]), got {max_seq_length}")
    max_tokens = max_seq_length - 3
    sentences = [s for s in document if s]
    instances = []
    target = _target_length(max_tokens, short_seq_prob, rng)
    chunk: list[list[int]] = []
    chunk_tokens = 0
    for i, sentence in enumerate(sentences):
        chunk.append(sentence)
        chunk_tokens += len(sentence)
        if i == len(sentences) - 1 or chunk_tokens >= target:
            instance = _instance_from_chunk(chunk, max_tokens, rng)
            if instance is not None:
                instances.append(instance)
            chunk, chunk_tokens = [], 0
            target = _target_length(max_tokens, short_seq_prob, rng)  # per instance (ALBERT: per document)
    return instances


def ngram_probabilities(max_ngram: int) -> np.ndarray:
    """``p(n)`` for n = 1..max_ngram, proportional to ``1/n`` (ALBERT's default, favouring short n-grams)."""
    weights = 1.0 / np.arange(1, max_ngram + 1)
    return weights / weights.sum()


def _run_lengths(special_tokens_mask: np.ndarray) -> np.ndarray:
    """For each position, how many non-special positions start there in a row (0 on special tokens)."""
    runs = np.zeros(len(special_tokens_mask) + 1, dtype=np.int64)
    for i in range(len(special_tokens_mask) - 1, -1, -1):
        runs[i] = 0 if special_tokens_mask[i] else runs[i + 1] + 1
    return runs[:-1]


def num_to_predict(length: int, mask_prob: float, max_predictions: int | None) -> int:
    """ALBERT's budget of masked positions: ``round(length * mask_prob)``, at least 1, at most ``max_predictions``."""
    budget = max(1, int(round(length * mask_prob)))
    return budget if max_predictions is None else min(budget, max_predictions)


def select_masked_spans(special_tokens_mask: np.ndarray, rng: np.random.Generator, mask_prob: float = 0.15,
                        max_ngram: int = 3, max_predictions: int | None = None) -> list[range]:
    """Choose non-overlapping n-grams of non-special tokens to mask.

    Until the budget (:func:`num_to_predict`) is spent: draw a length ``n`` with
    ``p(n) ∝ 1/n``, cut it to the budget left, and place it at the next start, in a random
    order of the non-special positions, where it fits (no special token, no overlap). Should
    every start be passed over, single free tokens fill the rest of the budget.

    ALBERT draws the start first and ``n`` second, skipping the start when that n-gram would
    overlap a chosen one; long n-grams are skipped more often, so its lengths favour 1-grams
    more than ``p(n)`` says. Drawing ``n`` first keeps the lengths at ``p(n)``, apart from the
    last n-grams, which the budget may shorten.

    Returns:
        The chosen n-grams as position ranges, in the order they were chosen.
    """
    special = np.asarray(special_tokens_mask, dtype=bool)
    budget = num_to_predict(len(special), mask_prob, max_predictions)
    runs = _run_lengths(special)
    cumulative = np.cumsum(ngram_probabilities(max_ngram))
    covered = np.zeros(len(special), dtype=bool)
    starts = iter(rng.permutation(np.flatnonzero(~special)).tolist())
    spans: list[range] = []
    chosen = 0
    while chosen < budget:
        n = 1 + int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        n = min(n, budget - chosen)
        start = next((s for s in starts if runs[s] >= n and not covered[s:s + n].any()), None)
        if start is None:  # every start was passed over (only in short or crowded sequences): single tokens
            free = np.flatnonzero(~special & ~covered)
            if len(free) == 0:
                break
            start, n = int(rng.choice(free)), 1
        covered[start:start + n] = True
        spans.append(range(start, start + n))
        chosen += n
    return spans


def mask_tokens(input_ids: np.ndarray, special_tokens_mask: np.ndarray, vocab_size: int, mask_token_id: int,
                rng: np.random.Generator, mask_prob: float = 0.15, max_ngram: int = 3,
                max_predictions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ALBERT n-gram masking of one sequence.

    Positions come from :func:`select_masked_spans`; each chosen token becomes ``[MASK]`` with
    probability 0.8, a random id in ``[0, vocab_size)`` with probability 0.1 (any id, as in
    ALBERT), and stays as it is otherwise. Special tokens are never chosen.

    Returns:
        ``(masked_ids, labels)``: int64 arrays of the input's length; ``labels`` holds the
        original id at chosen positions and ``IGNORE_INDEX`` (-100) elsewhere.
    """
    original = np.asarray(input_ids, dtype=np.int64)
    spans = select_masked_spans(special_tokens_mask, rng, mask_prob, max_ngram, max_predictions)
    positions = np.array([p for span in spans for p in span], dtype=np.int64)
    labels = np.full_like(original, IGNORE_INDEX)
    labels[positions] = original[positions]
    masked = original.copy()
    draw = rng.random(len(positions))
    to_mask = positions[draw < MASK_PROB_MASK]
    to_random = positions[(draw >= MASK_PROB_MASK) & (draw < MASK_PROB_MASK + MASK_PROB_RANDOM)]
    masked[to_mask] = mask_token_id
    masked[to_random] = rng.integers(0, vocab_size, size=len(to_random))
    return masked, labels
