"""The official SQuAD evaluation against values worked out by hand: normalisation, several gold
answers, v1.1 and v2.0 F1, unanswerable questions, HasAns / NoAns and the best thresholds."""

from __future__ import annotations

import pytest

from widenet_ds.squad import evaluate_v1, evaluate_v2, normalize_answer
from widenet_ds.squad.metrics import exact_match, f1_v1, f1_v2


@pytest.mark.parametrize("text, normalized", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("theater Anne", "theater anne"),  # articles only as whole words
    ("1,000 (about)", "1000 about"),
    ("  a  ", ""),
])
def test_normalisation_lower_case_punctuation_articles_white_space(text, normalized):
    assert normalize_answer(text) == normalized


def test_token_f1_counts_repeated_tokens_once_per_match():
    # "cat cat sat" vs "cat sat on mat": 2 shared, precision 2/3, recall 2/4 -> 4/7
    assert f1_v1("the cat the cat sat", "cat sat on mat") == pytest.approx(4 / 7)
    assert f1_v1("", "") == 0.0 and f1_v2("", "") == 1.0  # where v1.1 and v2.0 differ
    assert f1_v2("", "Paris") == 0.0 and f1_v2("the", "") == 1.0  # "the" normalises to nothing
    assert exact_match("Denver Broncos.", "the denver broncos") == 1


GOLDS_V1 = {
    "q1": ["the Denver Broncos", "Denver Broncos", "Broncos"],
    "q2": ["Saint Bernadette Soubirous"],
    "q3": ["in the late 1990s", "1990s"],
    "q4": ["Paris"],
}
PREDICTIONS_V1 = {
    "q1": "Denver Broncos.",  # EM 1, F1 1
    "q2": "a Bernadette Soubirous",  # 2 of 3 tokens: precision 1, recall 2/3 -> F1 0.8
    "q3": "The late 1990s",  # best gold "in late 1990s": F1 0.8 (the other gives 2/3); EM 0
    "q4": "",  # 0, 0
}


def test_v1_is_the_mean_of_the_best_over_gold_answers():
    assert evaluate_v1(GOLDS_V1, PREDICTIONS_V1) == pytest.approx({"exact_match": 25.0, "f1": 65.0})
    # a question without a prediction counts 0 over all of the data
    missing = {k: v for k, v in PREDICTIONS_V1.items() if k != "q1"}
    assert evaluate_v1(GOLDS_V1, missing) == pytest.approx({"exact_match": 0.0, "f1": 40.0})


GOLDS_V2 = {"a": ["Denver Broncos"], "b": [], "c": [], "d": ["in the late 1990s", "1990s"], "e": ["Saint Bernadette"]}
PREDICTIONS_V2 = {"a": "Denver Broncos", "b": "", "c": "Paris", "d": "The late 1990s", "e": ""}
NULL_ODDS = {"a": -3.0, "b": 2.0, "c": -0.5, "d": -1.0, "e": 1.5}  # "" exactly where the odds are > 0


def test_v2_scores_unanswerable_questions_and_finds_the_best_threshold():
    metrics = evaluate_v2(GOLDS_V2, PREDICTIONS_V2, NULL_ODDS, na_prob_thresh=0.0)
    assert metrics == pytest.approx({
        "exact": 40.0, "f1": 56.0, "total": 5,  # exact a, b; F1 a 1, b 1, d 0.8
        "HasAns_exact": 100 / 3, "HasAns_f1": 60.0, "HasAns_total": 3,
        "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
        # all "no answer" scores 2 (b, c); by rising odds a +1 (3), d +0.8 (3.8), c -1, e +0, b 0:
        "best_f1": 76.0, "best_f1_thresh": -1.0,
        "best_exact": 60.0, "best_exact_thresh": -3.0})  # exact: a +1 (3), then d +0, c -1
    assert evaluate_v2(GOLDS_V2, PREDICTIONS_V2, NULL_ODDS) == pytest.approx(metrics)  # the official 1.0 too


def test_v2_without_null_odds_has_no_best_keys_and_the_threshold_overrides_answers():
    plain = evaluate_v2(GOLDS_V2, PREDICTIONS_V2)
    assert "best_f1" not in plain and plain["exact"] == 40.0
    # odds above the threshold turn c's "Paris" into "" (correct) and a's answer into "" (wrong)
    overridden = evaluate_v2(GOLDS_V2, PREDICTIONS_V2, {**NULL_ODDS, "c": 3.0, "a": 3.0}, na_prob_thresh=0.0)
    assert overridden["exact"] == 40.0 and overridden["NoAns_exact"] == 100.0 and overridden["HasAns_exact"] == 0.0
