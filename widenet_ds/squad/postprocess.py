"""Start/end logits of the windows -> one answer per question: n-best span decoding as in Hugging
Face's ``postprocess_qa_predictions`` (``examples/pytorch/question-answering/utils_qa.py``).

For every window of a question, the ``n_best_size`` highest start and end logits are paired;
a pair is a candidate when both tokens are in the context, the end is not before the start and
the span has at most ``max_answer_length`` tokens; its score is start + end logit. The
candidates of all windows compete, and the text of the best one, cut from the context by the
tokens' character offsets, is the prediction.

v2.0: the null score of a question is the smallest [CLS] start + end logit over its windows.
``null_odds`` = null score - (start + end logit of the best non-empty span); the prediction is
"" when ``null_odds > null_score_diff_threshold``. The evaluation then picks the threshold that
maximises F1 on dev (``best_f1_thresh``), to be used for new data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .data import SquadExample
from .encoding import Feature


def _candidates(start_logits: np.ndarray, end_logits: np.ndarray, offsets: Sequence[tuple[int, int] | None],
                n_best_size: int, max_answer_length: int) -> list[dict[str, Any]]:
    """Valid spans of one window from its top start and end logits."""
    starts = np.argsort(start_logits)[-1:-n_best_size - 1:-1].tolist()
    ends = np.argsort(end_logits)[-1:-n_best_size - 1:-1].tolist()
    out = []
    for s in starts:
        for e in ends:
            if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                continue
            if e < s or e - s + 1 > max_answer_length:
                continue
            out.append({"offsets": (offsets[s][0], offsets[e][1]), "score": float(start_logits[s] + end_logits[e]),
                        "start_logit": float(start_logits[s]), "end_logit": float(end_logits[e])})
    return out


def _with_probabilities(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Softmax of the scores over the n-best list, as ``probability``."""
    scores = np.array([p.pop("score") for p in predictions])
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    for prob, prediction in zip(probs, predictions):
        prediction["probability"] = float(prob)
    return predictions


def postprocess_predictions(examples: Sequence[SquadExample], features: Sequence[Feature],
                            start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray],
                            version_2_with_negative: bool = False, n_best_size: int = 20,
                            max_answer_length: int = 30, null_score_diff_threshold: float = 0.0,
                            ) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]], dict[str, float]]:
    """(predictions id -> text, n-best lists id -> [{text, start_logit, end_logit, probability}],
    null odds id -> float (v2.0 only, else empty)). ``start_logits[i]`` / ``end_logits[i]`` are the
    logits of ``features[i]`` (at least as long as its ``offset_mapping``)."""
    if len(features) != len(start_logits) or len(features) != len(end_logits):
        raise ValueError(f"{len(features)} features but {len(start_logits)} / {len(end_logits)} logit rows")
    windows: dict[int, list[int]] = defaultdict(list)
    for i, feature in enumerate(features):
        windows[feature["example_index"]].append(i)
    predictions, nbest, null_odds = {}, {}, {}
    for index, example in enumerate(examples):
        null, candidates = None, []
        for i in windows[index]:
            starts, ends = np.asarray(start_logits[i]), np.asarray(end_logits[i])
            score = float(starts[0] + ends[0])  # [CLS] is the first token
            if null is None or score < null["score"]:
                null = {"offsets": (0, 0), "score": score, "start_logit": float(starts[0]),
                        "end_logit": float(ends[0])}
            candidates += _candidates(starts, ends, features[i]["offset_mapping"], n_best_size, max_answer_length)
        null_score = null["score"] if null is not None else 0.0
        if version_2_with_negative and null is not None:
            candidates.append(null)
        best = sorted(candidates, key=lambda c: c["score"], reverse=True)[:n_best_size]
        if version_2_with_negative and null is not None and not any(c is null for c in best):
            best.append(null)
        for candidate in best:
            start, end = candidate.pop("offsets")
            candidate["text"] = example.context[start:end] if candidate is not null else ""
        if not any(c["text"] for c in best):  # no span at all: a placeholder, as Hugging Face's code does
            best.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
        nbest[example.id] = _with_probabilities(best)
        answer = next(c for c in best if c["text"])
        if version_2_with_negative:
            null_odds[example.id] = null_score - answer["start_logit"] - answer["end_logit"]
            predictions[example.id] = "" if null_odds[example.id] > null_score_diff_threshold else answer["text"]
        else:
            predictions[example.id] = answer["text"]
    return predictions, nbest, null_odds
