"""SQuAD fine-tuning end to end on small files the tests write: a debug model learns to point at a
fixed answer; outputs agree with their own predictions and with the exported best model; expert
parallelism on 2 processes (v2.0); user mistakes refused before any compute; SQuAD and GLUE
fine-tuned folders start each other's job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from squad_fixtures import code_word_document, document, qa, train_fixture_tokenizer, write_json
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from widenet_ds import WideNetConfig, WideNetForQuestionAnswering, WideNetForSequenceClassification
from widenet_ds.config import ConfigError
from widenet_ds.distributed import free_port
from widenet_ds.jobs import model_sources
from widenet_ds.jobs.finetune import resolve_run
from widenet_ds.jobs.finetune_squad import run, span_start, squad_metrics
from widenet_ds.squad import SquadDataError, collate, encode_eval, gold_answers, load_squad, postprocess_predictions

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "ds_configs" / "finetune_cpu_smoke.json"
EP2 = REPO / "ds_configs" / "finetune_cpu_ep2.json"
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WINDOWS = ["--max_seq_length", "48", "--doc_stride", "16", "--max_query_length", "16"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_fixture_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("squad")
    return {"v1_train": write_json(root / "train-v1.1.json", code_word_document(48)),
            "v1_dev": write_json(root / "dev-v1.1.json", code_word_document(8, offset=60)),
            "v2_train": write_json(root / "train-v2.0.json", code_word_document(16, version="2.0", unanswerable=4)),
            "v2_dev": write_json(root / "dev-v2.0.json", code_word_document(8, offset=60, version="2.0",
                                                                            unanswerable=3))}


def _redecode(folder: Path, dev_file: Path, version: str) -> tuple[dict, dict]:
    """Predictions and null odds of the exported best model, loaded through the Auto class without
    DeepSpeed (ep_size 1), decoded with the job's settings."""
    model = AutoModelForQuestionAnswering.from_pretrained(folder / "best").eval()
    assert isinstance(model, WideNetForQuestionAnswering)
    tokenizer = AutoTokenizer.from_pretrained(folder / "best")
    examples = load_squad(version, "dev", dev_file)
    features = encode_eval(examples, tokenizer, max_seq_length=48, doc_stride=16, max_query_length=16)
    with torch.no_grad():
        out = model(**collate(features, tokenizer.pad_token_id))
    lengths = [len(f["input_ids"]) for f in features]
    starts = [row[:n] for row, n in zip(out.start_logits.numpy(), lengths)]
    ends = [row[:n] for row, n in zip(out.end_logits.numpy(), lengths)]
    predictions, _, null_odds = postprocess_predictions(examples, features, starts, ends,
                                                        version_2_with_negative=version == "2.0")
    return predictions, null_odds


def _check_outputs(folder: Path, dev_file: Path, version: str) -> dict:
    """eval_results.json is the official evaluation of predictions.json (and null_odds.json), which the
    exported model reproduces; the n-best lists lead with the predictions."""
    results = json.loads((folder / "eval_results.json").read_text())
    predictions = json.loads((folder / "predictions.json").read_text())
    null_odds = json.loads((folder / "null_odds.json").read_text()) if version == "2.0" else {}
    assert (folder / "null_odds.json").exists() == (version == "2.0")
    golds = gold_answers(load_squad(version, "dev", dev_file))
    assert set(predictions) == set(golds)
    recomputed = squad_metrics(version, golds, predictions, null_odds, 0.0)
    assert recomputed == pytest.approx({k: results[k] for k in recomputed})
    keys = {"exact_match", "f1"} | ({"HasAns_exact", "NoAns_f1", "best_f1", "best_f1_thresh"} if version == "2.0"
                                    else set())
    assert keys <= set(results)
    again, again_odds = _redecode(folder, dev_file, version)
    assert again == predictions
    assert again_odds == pytest.approx(null_odds, abs=1e-3)
    nbest = json.loads((folder / "nbest_predictions.json").read_text())
    for qid, text in predictions.items():
        assert text == "" or nbest[qid][0]["text"] == text or any(e["text"] == text for e in nbest[qid])
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "exact_match" in r]
    main = "f1" if version == "1.1" else "best_f1"
    assert results["best_step"] == max(evals, key=lambda r: r[main])["step"]
    assert any("expert_load" in r for r in records)
    return results


@pytest.mark.slow
def test_debug_preset_learns_to_point_at_a_fixed_answer(files, tokenizer_dir, tmp_path):
    out = tmp_path / "v1"
    best = run(["--version", "1.1", "--train_file", str(files["v1_train"]), "--validation_file", str(files["v1_dev"]),
                "--model_name_or_path", "preset:debug", "--tokenizer", str(tokenizer_dir), *WINDOWS,
                "--deepspeed_config", str(SMOKE), "--max_steps", "200", "--eval_every", "100", "--log_every", "20",
                "--output_dir", str(out)])
    results = _check_outputs(out, files["v1_dev"], "1.1")
    assert results["exact_match"] == 100.0 and results["f1"] == 100.0, results
    assert best["metrics"]["f1"] == 100.0
    assert set(json.loads((out / "predictions.json").read_text()).values()) == {"zebra"}
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["architectures"] == ["WideNetForQuestionAnswering"] and config["moe"]["ep_size"] == 1


@pytest.mark.distributed
def test_v2_with_expert_parallelism_on_two_processes(files, tokenizer_dir, tmp_path):
    out = tmp_path / "v2"
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "launch" / "finetune_squad.py"), "--version", "2.0", "--train_file", str(files["v2_train"]),
               "--validation_file", str(files["v2_dev"]), "--model_name_or_path", "preset:debug", "--tokenizer",
               str(tokenizer_dir), *WINDOWS, "--deepspeed_config", str(EP2), "--max_steps", "4", "--eval_every", "2",
               "--log_every", "2", "--output_dir", str(out)]
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}, "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = _check_outputs(out, files["v2_dev"], "2.0")
    assert results["HasAns_total"] == 5 and results["NoAns_total"] == 3 and results["null_score_diff_threshold"] == 0
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert json.loads((out / "ds_config.json").read_text())["moe"]["ep_size"] == 2


def _fails(argv, error, *needles):
    with pytest.raises(error) as err:
        run(argv)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_bad_input_is_refused_before_any_compute(files, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    base = ["--model_name_or_path", "preset:debug", "--tokenizer", str(tokenizer_dir), "--output_dir", str(out),
            "--deepspeed_config", str(SMOKE), "--max_steps", "2", *WINDOWS]
    v1 = ["--version", "1.1", "--train_file", str(files["v1_train"])]
    broken = write_json(tmp_path / "broken.json", '{"data": [{"paragraphs": [}]}')
    _fails([*v1, "--validation_file", str(broken), *base], SquadDataError, f"{broken}, line 1 column 27",
           "not valid JSON")
    empty = write_json(tmp_path / "empty.json", {"version": "1.1", "data": []})
    _fails([*v1, "--validation_file", str(empty), *base], SquadDataError, f"{empty}: no questions in it")
    _fails([*v1, "--validation_file", str(files["v2_dev"]), *base], SquadDataError, "--version 2.0")
    context = "The keeper lit the lamp at dusk."
    misplaced = write_json(tmp_path / "misplaced.json", document([(context, [
        {"id": "m", "question": "Who?", "answers": [{"text": "keeper", "answer_start": 0}]}])]))
    _fails([*v1, "--validation_file", str(misplaced), "--strict_answers", *base], SquadDataError,
           "answer 'keeper' at 0, the context there reads 'The ke'")
    _fails(["--version", "1.1", "--train_file", str(misplaced), "--validation_file", str(files["v1_dev"]), *base],
           SquadDataError, "no train question left")
    dev = ["--validation_file", str(files["v1_dev"])]
    _fails([*v1, *base], ConfigError, "give both --train_file and --validation_file")
    _fails([*v1, *dev, *base, "--doc_stride", "29"], ConfigError, "--doc_stride 29")
    _fails([*v1, *dev, *base, "--max_seq_length", "256"], ConfigError,
           "--max_seq_length 256 is longer than the model's max_position_embeddings 128")
    _fails([*v1, *dev, *base, "--deepspeed_config", str(REPO / "ds_configs" / "finetune_squad_v1.json")],
           ConfigError, "total_num_steps is 3649")
    assert not out.exists(), "nothing was trained or written"
    ok = write_json(tmp_path / "ok.json", document([(context, [qa("k", "Who?", context, "keeper")])]))
    assert load_squad("1.1", "dev", ok)[0].answers[0].start == 4


def _saved(model, tokenizer_dir: Path, folder: Path) -> Path:
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def test_squad_and_glue_folders_start_each_others_job(tokenizer_dir, tmp_path):
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = WideNetConfig.from_preset("debug", vocab_size=vocab)
    torch.manual_seed(0)
    squad = _saved(WideNetForQuestionAnswering(config), tokenizer_dir, tmp_path / "squad")
    glue = _saved(WideNetForSequenceClassification(config), tokenizer_dir, tmp_path / "glue")

    # a SQuAD folder for GLUE: the span head is dropped, the classifier starts fresh, the encoder is kept
    start = model_sources.load_start(str(squad), 3, {}, vocab)
    classifier = WideNetForSequenceClassification(start.config)
    model_sources.load_weights(classifier, start)
    source = WideNetForQuestionAnswering.from_pretrained(squad).state_dict()
    for key, value in classifier.state_dict().items():
        if key.startswith("widenet."):
            assert torch.equal(value, source[key]), key

    # a GLUE folder for SQuAD: the classifier is dropped, the span head starts fresh
    start = span_start(model_sources.load_start(str(glue), 2, {}, vocab))
    reader = WideNetForQuestionAnswering(start.config)
    model_sources.load_weights(reader, start)
    source = WideNetForSequenceClassification.from_pretrained(glue).state_dict()
    assert all(torch.equal(v, source[k]) for k, v in reader.state_dict().items() if k.startswith("widenet."))


PAPER = {"1": (5e-5, 2.0, 0.0, 3649, 365), "2": (3e-5, 1.2, 0.01, 8144, 814)}  # lr, eval C, lambda, steps, warmup


@pytest.mark.parametrize("version", sorted(PAPER))
def test_squad_json_holds_the_paper_settings(version):
    run_config, steps = resolve_run(REPO / "ds_configs" / f"finetune_squad_v{version}.json", 1, None, None, 100)
    sched = run_config.deepspeed["scheduler"]["params"]
    lr, eval_capacity, coef, total, warmup = PAPER[version]
    assert (run_config.global_batch_size, run_config.optimizer["params"]["lr"], sched["warmup_max_lr"]) == (48, lr, lr)
    assert (steps, sched["warmup_num_steps"], run_config.moe.capacity_factor) == (total, warmup, 1.2)
    assert (run_config.moe.eval_capacity_factor, run_config.moe.aux_loss_coef) == (eval_capacity, coef)
    for world in (2, 4, 8):  # the micro-batch divides the batch on 1-8 GPUs
        assert resolve_run(REPO / "ds_configs" / f"finetune_squad_v{version}.json", world, None, None, 100)[0]
