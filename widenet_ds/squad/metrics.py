"""The official SQuAD evaluation, v1.1 and v2.0 (the logic of ``evaluate-v1.1.py`` and
``evaluate-v2.0.py``), on gold answers keyed by question id.

Both compare a predicted text with every gold answer after the same normalisation (lower case,
punctuation removed, the articles a / an / the removed, white space collapsed) and take the
best: exact match (0 or 1) and token F1. They differ where v2.0 has unanswerable questions:

- v1.1: F1 is 0 when no token is shared; scores are over every question of the data
  (a question without a prediction scores 0).
- v2.0: gold answers that normalise to nothing are dropped and a question with none left has
  the single gold answer ""; F1 between an empty and a non-empty text is 0, between two empty
  texts 1; scores are over the questions that have a prediction. With ``na_probs`` (a
  no-answer score per question, here ``null_odds.json``) a question whose score is above
  ``na_prob_thresh`` counts as answered with "" (``exact``, ``f1``), and ``best_exact`` /
  ``best_f1`` are the scores at the threshold on ``na_probs`` that maximises each
  (``best_exact_thresh`` / ``best_f1_thresh``), found as the official script does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_v1(prediction: str, gold: str) -> float:
    """v1.1's token F1: 0 without a shared token."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def f1_v2(prediction: str, gold: str) -> float:
    """v2.0's token F1: an empty text against another is 1 when both are empty, else 0."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    return f1_v1(prediction, gold)


def evaluate_v1(golds: Mapping[str, list[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """``exact_match`` and ``f1`` (percent) over every question of ``golds``."""
    exact = f1 = 0.0
    for qid, answers in golds.items():
        if qid not in predictions:
            continue  # the official script scores a missing prediction 0
        exact += max(exact_match(predictions[qid], a) for a in answers)
        f1 += max(f1_v1(predictions[qid], a) for a in answers)
    return {"exact_match": 100.0 * exact / len(golds), "f1": 100.0 * f1 / len(golds)}


def raw_scores_v2(golds: Mapping[str, list[str]],
                  predictions: Mapping[str, str]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-question exact match and F1 of the questions that have a prediction."""
    exact, f1 = {}, {}
    for qid, answers in golds.items():
        if qid not in predictions:
            continue
        answers = [a for a in answers if normalize_answer(a)] or [""]
        exact[qid] = max(exact_match(predictions[qid], a) for a in answers)
        f1[qid] = max(f1_v2(predictions[qid], a) for a in answers)
    return exact, f1


def _with_threshold(scores: Mapping[str, float], na_probs: Mapping[str, float], has_answer: Mapping[str, bool],
                    threshold: float) -> dict[str, float]:
    """A question whose no-answer score is above ``threshold`` scores as if answered with ""."""
    return {qid: float(not has_answer[qid]) if na_probs[qid] > threshold else score for qid, score in scores.items()}


def _mean(scores: Mapping[str, float], qids: list[str]) -> float:
    return 100.0 * sum(scores[q] for q in qids) / len(qids)


def best_threshold(predictions: Mapping[str, str], scores: Mapping[str, float], na_probs: Mapping[str, float],
                   has_answer: Mapping[str, bool]) -> tuple[float, float]:
    """(best score in percent, its threshold): every question starts as "no answer"; in the order of
    rising ``na_probs`` each one takes its prediction, gaining its score (answerable) or losing 1
    (unanswerable with a non-empty prediction); the best running total wins (the official search)."""
    current = best = sum(1 for qid in has_answer if not has_answer[qid])
    threshold = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        current += scores[qid] if has_answer[qid] else (-1 if predictions[qid] else 0)
        if current > best:
            best, threshold = current, na_probs[qid]
    return 100.0 * best / len(scores), threshold


def evaluate_v2(golds: Mapping[str, list[str]], predictions: Mapping[str, str],
                na_probs: Mapping[str, float] | None = None, na_prob_thresh: float = 1.0) -> dict[str, float]:
    """The official v2.0 keys: exact, f1, total, HasAns_* / NoAns_* (when there are such questions)
    and, with ``na_probs``, best_exact, best_exact_thresh, best_f1, best_f1_thresh."""
    has_answer = {qid: bool(answers) for qid, answers in golds.items()}
    exact_raw, f1_raw = raw_scores_v2(golds, predictions)
    probs = na_probs if na_probs is not None else {qid: 0.0 for qid in predictions}
    exact = _with_threshold(exact_raw, probs, has_answer, na_prob_thresh)
    f1 = _with_threshold(f1_raw, probs, has_answer, na_prob_thresh)
    qids = list(exact)
    out = {"exact": _mean(exact, qids), "f1": _mean(f1, qids), "total": len(qids)}
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        group = [q for q in qids if has_answer[q] is wanted]
        if group:
            out.update({f"{prefix}_exact": _mean(exact, group), f"{prefix}_f1": _mean(f1, group),
                        f"{prefix}_total": len(group)})
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = best_threshold(predictions, exact_raw, na_probs, has_answer)
        out["best_f1"], out["best_f1_thresh"] = best_threshold(predictions, f1_raw, na_probs, has_answer)
    return out
