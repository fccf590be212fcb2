"""Reports from tiny real runs: two pretraining runs (WideNet and an ALBERT-shaped model) and a GLUE
fine-tuning run from the WideNet export, read by ``launch/report.py`` and by the pretraining job itself."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from data.english import book_text
from glue_fixtures import GLUE_FILES, write_glue_layout
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
PRETRAIN = ["--preset", "debug", "--vocab_size", "300", "--max_seq_length", "64", "--log_every", "1",
            "--eval_batches", "2", "--max_steps", "6", "--eval_every", "3", "--save_every", "6"]
ALBERT_LIKE = ["--override", "share_layer_norm=true", "--override", "num_experts=1", "--override", "top_k=1",
               "--override", "pre_layer_norm=false"]
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def _python(script: str, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _grow(content: str, rows: int) -> str:
    head, *body = content.splitlines(keepends=True)
    return head + "".join(body[i % len(body)] for i in range(rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    (root / "corpus").mkdir()
    (root / "corpus" / "book.txt").write_text(book_text() * 3, encoding="utf-8")
    corpus = ["--train_files", str(root / "corpus" / "*.txt")]
    logs = {"widenet": _python("pretrain.py", PRETRAIN + corpus + ["--output_dir", str(root / "widenet")]).stderr}
    logs["albert"] = _python("pretrain.py", PRETRAIN + ALBERT_LIKE + corpus + ["--output_dir", str(root / "albert")]).stderr
    glue = write_glue_layout(root / "glue", {"MRPC/train.tsv": _grow(GLUE_FILES["MRPC/train.tsv"], 16),
                                             "MRPC/dev.tsv": _grow(GLUE_FILES["MRPC/train.tsv"], 8),
                                             "MRPC/test.tsv": _grow(GLUE_FILES["MRPC/test.tsv"], 3)})
    _python("finetune_glue.py", ["--task", "mrpc", "--data_dir", str(glue), "--model_name_or_path",
                                 str(root / "widenet" / "final"), "--model_label", "widenet",
                                 "--deepspeed_config", str(ROOT / "ds_configs" / "finetune_cpu_smoke.json"),
                                 "--max_steps", "4", "--eval_every", "2", "--log_every", "1", "--max_seq_length",
                                 "64", "--output_dir", str(root / "mrpc")])
    return {"root": root, "logs": logs}


def _rows(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in lines if "event" not in r]
    return [r for r in lines if "lr" in r], [r for r in lines if "lr" not in r]


def _check_figures(report: Path) -> list[str]:
    """Every image report.md links exists and is a non-empty PNG; returns their names."""
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    assert links
    for link in links:
        path = report.parent / link
        assert path.read_bytes()[:8] == PNG, link
        with Image.open(path) as image:
            assert image.width > 200 and image.height > 100
            assert len(set(image.convert("L").getdata())) > 5, f"{link} is blank"
    return [Path(link).name for link in links]


def _table(report: Path) -> tuple[list[str], list[dict[str, str]]]:
    lines = report.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return header, rows


def test_records_have_time_tokens_and_the_block_statistics(runs):
    for name in ("widenet", "albert"):
        train, evals = _rows(runs["root"] / name)
        assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [3, 6]
        tokens = [r["tokens"] for r in train]
        assert all(b > a > 0 for a, b in zip(tokens, tokens[1:]))
        times = [r["time"] for r in train + evals]
        assert all(t >= 0 for t in times) and train[-1]["time"] >= train[0]["time"]
        for r in evals:
            assert len(r["block_cosine"]) == 2 and all(-1 <= c <= 1 for c in r["block_cosine"])
            assert len(r["ln_gamma_divergence_per_block"]) == 3
    widenet_eval = _rows(runs["root"] / "widenet")[1][-1]
    albert_eval = _rows(runs["root"] / "albert")[1][-1]
    assert widenet_eval["ln_gamma_divergence"] > 0 and widenet_eval["ln_beta_divergence"] > 0
    assert albert_eval["ln_gamma_divergence"] == 0 and albert_eval["ln_beta_divergence"] == 0


def test_tensorboard_has_per_block_expert_load_and_dropped_fraction(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["root"] / "widenet" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for j in range(3):
        assert f"train/dropped_fraction/block_{j:02d}" in tags and f"train/expert_imbalance/block_{j:02d}" in tags
        assert {f"train/expert_load/block_{j:02d}/expert_{k:02d}" for k in range(4)} <= tags
    assert {"eval/block_cosine/blocks_00_01", "eval/block_cosine/blocks_01_02",
            "eval/ln_gamma_divergence_per_block/block_02"} <= tags
    loads = [events.Scalars(f"train/expert_load/block_00/expert_{k:02d}")[-1].value for k in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5) and len(events.Scalars("train/dropped_fraction/block_00")) == 6


def test_the_pretraining_job_writes_its_report_and_prints_a_summary(runs):
    out = runs["root"] / "widenet"
    log = runs["logs"]["widenet"]
    assert "pretraining finished: 6 steps" in log and "final eval: mlm_accuracy" in log
    assert f"report: {out / 'report' / 'report.md'}" in log
    assert f"tensorboard --logdir {out / 'tensorboard'}" in log and f"metrics: {out / 'metrics.jsonl'}" in log
    names = _check_figures(out / "report" / "report.md")
    assert {"loss_vs_step.png", "expert_load_widenet.png", "dropped_widenet.png",
            "layer_norm_distribution.png"} <= set(names)
    header, rows = _table(out / "report" / "report.md")
    assert [r["run"] for r in rows] == ["widenet"] and rows[0]["steps"] == "6"
    train = _rows(out)[0]
    assert rows[0]["tokens"] == f"{train[-1]['tokens']:,}"


def test_report_of_several_runs_side_by_side(runs, tmp_path):
    root = runs["root"]
    result = _python("report.py", [str(root / "widenet"), str(root / "albert"), str(root / "mrpc"),
                                   "--out", str(tmp_path / "report")])
    report = tmp_path / "report" / "report.md"
    assert f"report written to {report}" in result.stdout
    names = set(_check_figures(report))
    assert {"loss_vs_step.png", "loss_vs_tokens.png", "learning_rate.png", "throughput.png", "eval.png",
            "block_cosine.png", "layer_norm_over_training.png", "expert_load_widenet.png", "expert_load_mrpc.png",
            "dropped_widenet.png", "layer_norm_distribution.png"} <= names
    assert "expert_load_albert.png" not in names  # a dense model routes nothing
    header, rows = _table(report)
    assert [r["run"] for r in rows] == ["widenet", "albert", "mrpc"]
    assert [r["steps"] for r in rows] == ["6", "6", "4"]
    assert [r["job"] for r in rows] == ["pretrain", "pretrain", "finetune_glue"]
    results = json.loads((root / "mrpc" / "eval_results.json").read_text())
    assert rows[2]["mrpc f1"] == f"{results['f1']:.4g}" and rows[0]["mrpc f1"] == "–"
    assert rows[0]["eval_mlm_accuracy"] != "–" and rows[2]["eval_mlm_accuracy"] == "–"
    assert header.index("steps") < header.index("train loss") < header.index("eval_loss") < header.index("mrpc f1")
    # the LayerNorm table of the runs' exports: ALBERT's shared pair is 0
    text = report.read_text()
    assert re.search(r"\| albert \| 3 \| one shared pair \| 0 \| 0 \| 0 \| 0 \|", text)
    assert float(re.search(r"\| widenet \| 3 \| one pair per block \| (\S+) \|", text).group(1)) > 0


def test_layer_norm_report_from_an_export_and_a_checkpoint(runs, tmp_path):
    root = runs["root"]
    checkpoint = next((root / "widenet" / "checkpoints").glob("step_*"))
    _python("report.py", ["--ln", str(checkpoint), str(root / "albert" / "final"), "--out", str(tmp_path / "ln")])
    text = (tmp_path / "ln" / "report.md").read_text()
    assert "| run |" not in text and _check_figures(tmp_path / "ln" / "report.md") == ["layer_norm_distribution.png"]
    assert float(re.search(rf"\| {checkpoint.name} \| 3 \| one pair per block \| (\S+) \|", text).group(1)) > 0


def test_a_folder_that_is_not_a_run_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _python("report.py", [str(tmp_path / "empty"), "--out", str(tmp_path / "out")], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {tmp_path / 'empty'}: no metrics.jsonl" in result.stderr
    result = _python("report.py", ["--ln", str(tmp_path / "empty"), "--out", str(tmp_path / "out")], check=False)
    assert result.returncode == 1 and "holds no model" in result.stderr and "Traceback" not in result.stderr
