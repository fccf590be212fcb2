"""GLUE fine-tuning end to end on small files in the GLUE layouts: outputs consistent with their
own predictions and with the exported best model; every starting point; expert parallelism on
2 processes; user mistakes named before any training."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from glue_fixtures import EXPECTED, GLUE_FILES, tiny_tokenizer, write_glue_layout
from transformers import AlbertConfig, AlbertForPreTraining, AutoTokenizer

from widenet_ds import (
    WideNetConfig,
    WideNetForPreTraining,
    WideNetForSequenceClassification,
)
from widenet_ds.config import ConfigError
from widenet_ds.distributed import close_distributed, free_port, init_distributed
from widenet_ds.engine import checkpointing
from widenet_ds.engine.build import initialize_engine
from widenet_ds.engine.ds_config import load_run_config
from widenet_ds.glue import (
    GlueDataError,
    collate,
    compute_metrics,
    encode,
    get_task,
    load_split,
)
from widenet_ds.jobs.finetune import resolve_run, run
from widenet_ds.jobs.glue_grid import main as glue_table

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "ds_configs" / "finetune_cpu_smoke.json"
EP2 = REPO / "ds_configs" / "finetune_cpu_ep2.json"
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs
SHORT = ["--max_steps", "6", "--eval_every", "3", "--log_every", "2", "--max_seq_length", "64"]


def _grow(content: str, rows: int) -> str:
    """The header line of a GLUE file, then its data rows repeated to ``rows`` rows."""
    head, *body = content.splitlines(keepends=True)
    return head + "".join(body[i % len(body)] for i in range(rows))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    files = {}
    for folder in ("MRPC", "STS-B"):
        files[f"{folder}/train.tsv"] = _grow(GLUE_FILES[f"{folder}/train.tsv"], 16)
        files[f"{folder}/dev.tsv"] = _grow(GLUE_FILES[f"{folder}/train.tsv"], 8)
        files[f"{folder}/test.tsv"] = _grow(GLUE_FILES[f"{folder}/test.tsv"], 3)
    files.update({name: content for name, content in GLUE_FILES.items() if name.startswith(("MNLI", "diagnostic"))})
    return write_glue_layout(tmp_path_factory.mktemp("glue"), files)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer([line for content in GLUE_FILES.values() for line in content.splitlines()]).save_pretrained(path)
    return path


def _reload_logits(best: Path, examples) -> np.ndarray:
    """Dev logits of the exported best model, loaded without DeepSpeed (ep_size 1)."""
    model = WideNetForSequenceClassification.from_pretrained(best).eval()
    tokenizer = AutoTokenizer.from_pretrained(best)
    batch = collate(encode(examples, tokenizer, 64), tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits.numpy()


def _check_run(folder: Path, task: str, dev: dict[str, list], submissions: dict[str, int]) -> dict:
    """eval_results.json agrees with the saved dev predictions and with best/ reloaded; the
    submission files have GLUE's format; metrics.jsonl has the MoE statistics."""
    spec = get_task(task)
    results = json.loads((folder / "eval_results.json").read_text())
    assert set(results) == {"task", "model", "seed", "best_step", *spec.metric_keys}
    saved = json.loads((folder / "dev_predictions.json").read_text())
    assert set(saved) == set(dev)
    recomputed = {}
    for split, examples in dev.items():
        assert saved[split]["labels"] == [e.label for e in examples]
        metrics = compute_metrics(task, np.array(saved[split]["logits"]), saved[split]["labels"], split=split)
        reloaded = _reload_logits(folder / "best", examples)
        np.testing.assert_allclose(reloaded, saved[split]["logits"], atol=1e-4, rtol=1e-4)
        again = compute_metrics(task, reloaded, saved[split]["labels"], split=split)
        assert again == pytest.approx(metrics, nan_ok=True)
        recomputed.update(metrics)
    assert recomputed == pytest.approx({k: results[k] for k in spec.metric_keys}, nan_ok=True)

    assert sorted(p.name for p in (folder / "submission").iterdir()) == sorted(submissions)
    for name, rows in submissions.items():
        lines = (folder / "submission" / name).read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == 1 + rows
        for number, line in enumerate(lines[1:]):
            index, prediction = line.split("\t")
            assert int(index) == number
            assert prediction in spec.file_labels if spec.file_labels else 0 <= float(prediction) <= 5

    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train and all(r["aux_loss"] > 0 for r in train)
    assert np.allclose(np.sum(train[-1]["expert_load"], axis=1), 1.0)  # (T, E) shares per routing call
    evals = [r for r in records if spec.main_metric in r]
    best = max(evals, key=lambda r: r[spec.main_metric] if np.isfinite(r[spec.main_metric]) else -np.inf)
    assert results["best_step"] == best["step"]
    assert (folder / "best" / "tokenizer.json").is_file() and json.loads((folder / "run.json").read_text())["git"]
    return results


@pytest.mark.slow
def test_classification_and_regression_from_a_preset_with_the_table(glue_dir, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "grid"
    table = glue_table(["run", "--models", "debug=preset:debug", "--tasks", "mrpc", "stsb", "mnli", "--seeds", "1",
                        "--output_dir", str(out), "--data_dir", str(glue_dir), "--tokenizer", str(tokenizer_dir),
                        "--deepspeed_config", str(SMOKE), *SHORT, "--profile", "2:3"])
    expected = {"mrpc": {"MRPC.tsv": 3}, "stsb": {"STS-B.tsv": 3},
                "mnli": {"MNLI-m.tsv": 1, "MNLI-mm.tsv": 2, "AX.tsv": 1}}  # MNLI: both dev splits, AX too
    for task, submissions in expected.items():
        dev = {split: load_split(task, split, data_dir=glue_dir) for split in get_task(task).dev_splits}
        results = _check_run(out / "debug" / task / "seed1", task, dev, submissions)
        assert (results["model"], results["seed"]) == ("debug", 1)
        profile = (out / "debug" / task / "seed1" / "profile" / "ops_rank0.txt").read_text()
        assert profile.startswith("optimizer steps 2..3 (2): ") and "aten::" in profile
    assert table.splitlines()[0] == "| Model | MRPC | STS-B | MNLI-m | Avg |"
    assert table.splitlines()[2].startswith("| debug |")
    assert table in capsys.readouterr().out
    assert glue_table(["collect", str(out)]) == table
    config = json.loads((out / "debug" / "mrpc" / "seed1" / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "not_equivalent", "1": "equivalent"} and config["moe"]["drop_tokens"] is False


def _pretraining_starts(root: Path, tokenizer) -> dict[str, Path]:
    """A pretraining export, a DeepSpeed checkpoint of pretraining and an ALBERT folder, each with
    the tokenizer where the fine-tuning job looks for it."""
    config = WideNetConfig.from_preset("debug", vocab_size=len(tokenizer))
    torch.manual_seed(1)
    WideNetForPreTraining(config).save_pretrained(root / "export")
    tokenizer.save_pretrained(root / "export")

    init_distributed()
    try:
        engine, _, _ = initialize_engine(WideNetForPreTraining(config), load_run_config(SMOKE, max_steps=1))
        checkpointing.save_checkpoint(engine, root / "pretrain" / "checkpoints", 1, {"step": 1}, config, {})
    finally:
        close_distributed()
    tokenizer.save_pretrained(root / "pretrain" / "tokenizer")

    albert = AlbertConfig(vocab_size=len(tokenizer), embedding_size=16, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    AlbertForPreTraining(albert).save_pretrained(root / "albert")
    tokenizer.save_pretrained(root / "albert")
    return {"export": root / "export", "ckpt": root / "pretrain" / "checkpoints" / "step_00000001",
            "albert": root / "albert"}


def _mrpc_files(root: Path) -> dict[str, Path]:
    """MRPC as CSV (train, test) and JSON Lines (dev), in the hub's column names."""
    rows = [[e.text_a, e.text_b, e.label] for e in EXPECTED[("mrpc", "train")]]
    files = {"train": root / "train.csv", "dev": root / "dev.jsonl", "test": root / "test.csv"}
    for split, n, columns in (("train", 16, 3), ("test", 3, 2)):
        with files[split].open("w", newline="") as f:
            csv.writer(f).writerows([["sentence1", "sentence2", "label"][:columns],
                                     *(rows[i % 2][:columns] for i in range(n))])
    keys = ("sentence1", "sentence2", "label")
    files["dev"].write_text("".join(json.dumps(dict(zip(keys, rows[i % 2]))) + "\n" for i in range(6)))
    return files


@pytest.mark.distributed
def test_every_starting_point_on_two_processes_with_expert_parallelism(tokenizer_dir, tmp_path):
    starts = _pretraining_starts(tmp_path, AutoTokenizer.from_pretrained(tokenizer_dir))
    files = _mrpc_files(tmp_path)
    out = tmp_path / "grid"
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "launch" / "glue_table.py"), "run", "--models", *(f"{k}={v}" for k, v in starts.items()),
               "--tasks", "mrpc", "--seeds", "3", "--output_dir", str(out), "--train_file", str(files["train"]),
               "--validation_file", str(files["dev"]), "--test_file", str(files["test"]),
               "--deepspeed_config", str(EP2), *SHORT]
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    dev_examples = load_split("mrpc", "validation", data_file=files["dev"])
    for label in starts:
        folder = out / label / "mrpc" / "seed3"
        assert _check_run(folder, "mrpc", {"validation": dev_examples}, {"MRPC.tsv": 3})["model"] == label
        assert json.loads((folder / "run.json").read_text())["world_size"] == 2
        assert json.loads((folder / "ds_config.json").read_text())["moe"]["ep_size"] == 2
        assert json.loads((folder / "best" / "config.json").read_text())["moe"]["ep_size"] == 1
    assert [line.split(" |")[0] for line in done.stdout.splitlines() if line.startswith("| ")][1:] == [
        "| export", "| ckpt", "| albert"]


def _fails(argv, error, *needles):
    with pytest.raises(error) as err:
        run(argv)
    for needle in needles:
        assert needle in str(err.value)


def test_user_mistakes_are_named_before_any_training(glue_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    base = ["--output_dir", str(out), "--deepspeed_config", str(SMOKE), *SHORT]
    preset = ["--model_name_or_path", "preset:debug", "--tokenizer", str(tokenizer_dir), *base]
    _fails(["--task", "glue9", "--data_dir", str(glue_dir), *preset], GlueDataError, "unknown GLUE task 'glue9'")
    _fails(["--task", "rte", "--data_dir", str(glue_dir), *preset], GlueDataError,
           f"expected {glue_dir / 'RTE' / 'train.tsv'}", "there is no folder")

    broken = write_glue_layout(tmp_path / "broken", {
        "MRPC/train.tsv": GLUE_FILES["MRPC/train.tsv"] + "1\t12\t13\tonly one sentence\n",
        "MRPC/dev.tsv": GLUE_FILES["MRPC/dev.tsv"], "MRPC/test.tsv": GLUE_FILES["MRPC/test.tsv"]})
    _fails(["--task", "mrpc", "--data_dir", str(broken), *preset], GlueDataError,
           f"{broken / 'MRPC' / 'train.tsv'}, line 4", "expected 5 tab-separated columns, got 4")

    export = tmp_path / "export"
    WideNetForPreTraining(WideNetConfig.from_preset("debug", vocab_size=300)).save_pretrained(export)
    from_export = ["--task", "mrpc", "--data_dir", str(glue_dir), "--model_name_or_path", str(export), *base]
    _fails(from_export, ConfigError, "no tokenizer saved with", "pass --tokenizer")
    _fails([*from_export, "--tokenizer", str(tokenizer_dir)], ConfigError,
           f"the tokenizer has {len(AutoTokenizer.from_pretrained(tokenizer_dir))} tokens but the model's embeddings "
           "have 300")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(export)
    WideNetForPreTraining(WideNetConfig.from_preset("debug", vocab_size=len(AutoTokenizer.from_pretrained(
        tokenizer_dir)))).save_pretrained(export)
    _fails([*from_export, "--override", "num_experts=8", "--override", "hidden_dropout_prob=0.1"], ConfigError,
           "--override num_experts=8: the checkpoint has num_experts=4")
    _fails([*from_export, "--max_seq_length", "512"], ConfigError,
           "--max_seq_length 512 is longer than the model's max_position_embeddings 128")
    paper = REPO / "ds_configs" / "finetune_mrpc.json"
    _fails([*from_export, "--deepspeed_config", str(paper)], ConfigError,
           "total_num_steps is 800", "this run asks for 6 steps")
    _fails([*from_export, "--profile", "5:9"], ConfigError, "--profile 5:9 ends after the run's last step (6)")
    assert not out.exists(), "nothing was trained or written"


PAPER = {  # task: lr, global batch, steps, warmup (WideNet paper for MNLI and SST-2, else ALBERT's Table 14)
    "mnli": (3e-5, 128, 10000, 1000), "sst2": (4e-5, 128, 5234, 1256), "cola": (1e-5, 16, 5336, 320),
    "stsb": (2e-5, 16, 3598, 214), "mrpc": (2e-5, 32, 800, 200), "qqp": (5e-5, 128, 14000, 1000),
    "qnli": (1e-5, 32, 33112, 1986), "rte": (3e-5, 32, 800, 200), "wnli": (2e-5, 16, 120, 12)}


@pytest.mark.parametrize("task", sorted(PAPER))
def test_task_json_holds_the_paper_settings_and_fixes_the_run_length(task):
    run, steps = resolve_run(REPO / "ds_configs" / f"finetune_{task}.json", 1, None, None, num_train=100)
    sched = run.deepspeed["scheduler"]["params"]
    assert (run.optimizer["params"]["lr"], run.global_batch_size, steps, sched["warmup_num_steps"]) == PAPER[task]
    assert (sched["total_num_steps"], sched["warmup_max_lr"], sched["warmup_type"]) == (steps, PAPER[task][0], "linear")
    assert (run.moe.capacity_factor, run.moe.aux_loss_coef, run.optimizer["type"]) == (1.2, 0.01, "AdamW")


def test_run_length_from_max_steps_or_epochs_with_an_auto_schedule():
    assert resolve_run(SMOKE, 1, 7, None, num_train=10)[1] == 7
    run, steps = resolve_run(SMOKE, 1, None, 2.0, num_train=10)  # 2 epochs of 10 examples, 4 a step
    assert steps == 5 and run.deepspeed["scheduler"]["params"]["total_num_steps"] == 5
    with pytest.raises(ConfigError, match="give --max_steps or --epochs"):
        resolve_run(SMOKE, 1, None, None, num_train=10)
