"""SQuAD data on small files the tests write: every malformed input named, misplaced answers
counted and skipped (or refused), windows with a document stride whose answer positions point at
the answer's text, and n-best decoding over windows that recovers answers across window borders."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
from squad_fixtures import code_word_document, document, qa, train_fixture_tokenizer, write_json

from widenet_ds.squad import (
    SquadDataError,
    check_lengths,
    encode_eval,
    encode_train,
    evaluate_v1,
    evaluate_v2,
    gold_answers,
    load_squad,
    postprocess_predictions,
)

CONTEXT = "The river rose steadily through the night, and by morning the lower fields were under water."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_fixture_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_official_layout_loads_every_question(tmp_path):
    path = write_json(tmp_path / "dev.json", document([(CONTEXT, [
        qa("a", "What rose?", CONTEXT, "The river", "river"),
        qa("b", "When?", CONTEXT, "by morning")])]))
    examples = load_squad("1.1", "dev", path)
    assert [e.id for e in examples] == ["a", "b"]
    assert gold_answers(examples) == {"a": ["The river", "river"], "b": ["by morning"]}
    assert examples[0].answers[1].start == CONTEXT.index("river") and examples[0].title == "Fixture"


@pytest.mark.parametrize("content, needles", [
    ('{"data": [', ["line 1 column 11", "not valid JSON"]),
    ("", ["is empty"]),
    ({"articles": []}, ['an object with a "data" list']),
    ({"data": []}, ["no questions in it"]),
    (document([(CONTEXT, [{"id": "a", "question": "", "answers": []}])]),
     ["data[0].paragraphs[0].qas[0].question: expected a non-empty string"]),
    (document([(CONTEXT, [{"id": "a", "question": "Q?", "answers": [{"text": "river", "answer_start": "4"}]}])]),
     ["qas[0].answers[0].answer_start: expected an integer"]),
    (document([(CONTEXT, [qa("a", "Q?", CONTEXT, "river"), qa("a", "R?", CONTEXT, "night")])]),
     ["appear more than once", "'a'"]),
    (document([(CONTEXT, [qa("a", "Q?", CONTEXT, impossible=True)])]), ["unanswerable", "--version 2.0"]),
    (document([("", [qa("a", "Q?", "x", "x")])]), ["paragraphs[0].context: expected a non-empty string"]),
])
def test_malformed_files_are_refused_naming_the_place(tmp_path, content, needles):
    path = write_json(tmp_path / "train.json", content)
    with pytest.raises(SquadDataError) as err:
        load_squad("1.1", "train", path)
    assert str(path) in str(err.value)
    for needle in needles:
        assert needle in str(err.value)


def test_v2_answers_must_agree_with_is_impossible(tmp_path):
    both = qa("a", "Q?", CONTEXT, "river", impossible=True)
    neither = qa("b", "Q?", CONTEXT, impossible=False)
    with pytest.raises(SquadDataError) as err:
        load_squad("2.0", "dev", write_json(tmp_path / "dev.json", document([(CONTEXT, [both, neither])], "v2.0")))
    assert "is_impossible is true but it has 1 answer(s)" in str(err.value)
    assert "is_impossible is false but it has no answer" in str(err.value)
    ok = load_squad("2.0", "dev", write_json(tmp_path / "ok.json", document([(CONTEXT, [qa("c", "Q?", CONTEXT)])])))
    assert ok[0].is_impossible and ok[0].answers == ()  # the hub marks unanswerable by no answers alone


def test_misplaced_answers_are_counted_and_skipped_in_train_kept_in_dev_or_refused(tmp_path, caplog):
    good = qa("good", "What rose?", CONTEXT, "river")
    bad = {"id": "bad", "question": "When?", "answers": [{"text": "morning", "answer_start": 3}]}
    path = write_json(tmp_path / "train.json", document([(CONTEXT, [good, bad])]))
    with caplog.at_level(logging.WARNING, logger="widenet_ds"):
        train = load_squad("1.1", "train", path)
        dev = load_squad("1.1", "dev", path)
    assert [e.id for e in train] == ["good"] and [e.id for e in dev] == ["good", "bad"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 of 2 question(s)" in m and "skipped them (ids 'bad')" in m for m in messages)
    assert any("kept: the evaluation compares answer texts only" in m for m in messages)
    with pytest.raises(SquadDataError, match="id 'bad', answer 'morning' at 3, the context there reads ' river '"):
        load_squad("1.1", "train", path, strict=True)
    only_bad = write_json(tmp_path / "bad.json", document([(CONTEXT, [bad])]))
    with pytest.raises(SquadDataError, match="no train question left"):
        load_squad("1.1", "train", only_bad)


def test_window_settings_are_checked():
    assert check_lengths(384, 64, 128) == []
    assert "must be smaller than the context room of a window, 21" in check_lengths(32, 8, 21)[0]
    assert "leaves no room for the context" in check_lengths(16, 13, 0)[0]


def load_squad_from(content, version="1.1"):
    """The dev questions of a document, through a file as a user would give them."""
    with tempfile.TemporaryDirectory() as folder:
        return load_squad(version, "dev", write_json(Path(folder) / "data.json", content))


def _answer_text(feature, offsets, context):
    start, end = feature["start_positions"], feature["end_positions"]
    return context[offsets[start][0]:offsets[end][1]]


def test_windows_point_at_the_answer_or_at_cls_when_it_is_cut(tokenizer):
    examples = load_squad_from(code_word_document(8))
    train = encode_train(examples, tokenizer, max_seq_length=32, doc_stride=8, max_query_length=16)
    dev = encode_eval(examples, tokenizer, max_seq_length=32, doc_stride=8, max_query_length=16)
    assert [f["input_ids"] for f in train] == [f["input_ids"] for f in dev]  # the same windows
    assert len(dev) > 2 * len(examples)  # long contexts: several windows each
    cut = 0
    for feature, window in zip(train, dev):
        context = examples[window["example_index"]].context
        answer = examples[window["example_index"]].answers[0]
        covered = [o for o in window["offset_mapping"] if o is not None]
        inside = covered[0][0] <= answer.start and answer.start + len(answer.text) <= covered[-1][1]
        if inside:
            assert _answer_text(feature, window["offset_mapping"], context) == "zebra"
        else:
            assert feature["start_positions"] == feature["end_positions"] == 0  # [CLS]
            cut += covered[0][0] < answer.start + len(answer.text) and answer.start < covered[-1][1]
        assert len(feature["input_ids"]) <= 32
    assert cut > 0, "some window holds part of the answer only"
    for example in examples:  # every answer lies whole in at least one window
        assert any(f["start_positions"] > 0 for f, w in zip(train, dev) if examples[w["example_index"]] is example)


def test_long_questions_are_cut_to_max_query_length(tokenizer):
    question = "What is the code word that the keeper wrote into the logbook every evening?"
    examples = load_squad_from(document([(CONTEXT, [qa("a", question, CONTEXT, "river")])]))
    feature = encode_eval(examples, tokenizer, max_seq_length=64, doc_stride=8, max_query_length=5)[0]
    question_tokens = feature["token_type_ids"].count(0) - 2  # [CLS] and the first [SEP]
    assert question_tokens == 5


def _oracle_logits(train_features, size=10.0):
    """Logits that put the gold start/end (or [CLS]) of each window above everything else."""
    starts, ends = [], []
    for feature in train_features:
        s, e = np.zeros(len(feature["input_ids"])), np.zeros(len(feature["input_ids"]))
        s[feature["start_positions"]] += size
        e[feature["end_positions"]] += size
        starts.append(s)
        ends.append(e)
    return starts, ends


def test_decoding_over_windows_recovers_answers_across_window_borders(tokenizer):
    examples = load_squad_from(code_word_document(8))
    settings = dict(max_seq_length=32, doc_stride=8, max_query_length=16)
    starts, ends = _oracle_logits(encode_train(examples, tokenizer, **settings))
    dev = encode_eval(examples, tokenizer, **settings)
    predictions, nbest, null_odds = postprocess_predictions(examples, dev, starts, ends, n_best_size=5,
                                                            max_answer_length=10)
    assert predictions == {e.id: "zebra" for e in examples} and null_odds == {}
    assert evaluate_v1(gold_answers(examples), predictions) == {"exact_match": 100.0, "f1": 100.0}
    for entries in nbest.values():
        assert entries[0]["text"] == "zebra" and entries[0]["start_logit"] == 10.0
        assert sum(e["probability"] for e in entries) == pytest.approx(1.0)
        assert len(entries) <= 5
    # a span longer than max_answer_length is never taken
    _, short, _ = postprocess_predictions(examples, dev, starts, ends, n_best_size=5, max_answer_length=1)
    one_token = {(examples[w["example_index"]].id, examples[w["example_index"]].context[o[0]:o[1]])
                 for w in dev for o in w["offset_mapping"] if o is not None}
    assert all((qid, e["text"]) in one_token for qid, entries in short.items() for e in entries)


def test_v2_null_score_is_the_smallest_cls_score_and_the_threshold_decides(tokenizer):
    examples = load_squad_from(code_word_document(6, version="2.0", unanswerable=2), version="2.0")
    settings = dict(max_seq_length=32, doc_stride=8, max_query_length=16)
    starts, ends = _oracle_logits(encode_train(examples, tokenizer, **settings))
    dev = encode_eval(examples, tokenizer, **settings)
    predictions, nbest, null_odds = postprocess_predictions(examples, dev, starts, ends, version_2_with_negative=True)
    for example in examples:
        if example.answers:  # the window with the answer has [CLS] logits 0: null 0, best span 20
            assert (predictions[example.id], null_odds[example.id]) == ("zebra", -20.0)
        else:  # every window's [CLS] scores 20; the best span scores 0
            assert (predictions[example.id], null_odds[example.id]) == ("", 20.0)
            assert any(e["text"] == "" for e in nbest[example.id])
    metrics = evaluate_v2(gold_answers(examples), predictions, null_odds, na_prob_thresh=0.0)
    assert (metrics["exact"], metrics["best_f1"], metrics["NoAns_total"]) == (100.0, 100.0, 2)
    everything, _, _ = postprocess_predictions(examples, dev, starts, ends, version_2_with_negative=True,
                                               null_score_diff_threshold=30.0)
    assert all(everything.values())  # a high threshold answers every question


def test_hub_rows_become_the_official_layout_and_pass_the_same_checks(monkeypatch):
    import datasets

    asked = []
    rows = [{"id": "h1", "title": "T", "context": CONTEXT, "question": "What rose?",
             "answers": {"text": ["The river"], "answer_start": [0]}},
            {"id": "h2", "title": "T", "context": CONTEXT, "question": "Who flew?",
             "answers": {"text": [], "answer_start": []}}]

    def load_dataset(name, split):
        asked.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    examples = load_squad("2.0", "dev")
    assert asked == [("rajpurkar/squad_v2", "validation")]
    assert [(e.id, e.is_impossible, [a.text for a in e.answers]) for e in examples] == [
        ("h1", False, ["The river"]), ("h2", True, [])]
    with pytest.raises(SquadDataError, match="an unanswerable question; SQuAD 1.1 has none"):
        load_squad("1.1", "train")
    assert asked[-1] == ("rajpurkar/squad", "train")

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SquadDataError, match="could not load rajpurkar/squad .*pass the official JSON files"):
        load_squad("1.1", "dev")
