"""The small-scale study script end to end in its CPU-sized mode: two models pretrained side by side
with one tokenizer, GLUE fine-tuning from their exports, the reports, the table and the records, and
nothing heavier than metrics, figures and JSON in its results."""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from data.english import book_text
from glue_fixtures import GLUE_FILES, write_glue_layout

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "paper_study.sh"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHON": os.sys.executable}


def _grow(content: str, rows: int) -> str:
    head, *body = content.splitlines(keepends=True)
    return head + "".join(body[i % len(body)] for i in range(rows))


def _study(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=900)


def test_the_corpus_is_required_before_anything_runs(tmp_path):
    result = _study(["--smoke", "--out", str(tmp_path / "out")])
    assert result.returncode == 2 and "error: --corpus is required" in result.stderr
    assert not (tmp_path / "out").exists()
    result = _study(["--corpus", "x.txt", "--bogus"])
    assert result.returncode == 2 and "unknown option --bogus" in result.stderr


@pytest.mark.slow
def test_smoke_study_pretrains_fine_tunes_and_reports(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "book.txt").write_text(book_text() * 3, encoding="utf-8")
    glue = write_glue_layout(tmp_path / "glue", {
        f"{folder}/{split}.tsv": _grow(GLUE_FILES[f"{folder}/{'test' if split == 'test' else 'train'}.tsv"], rows)
        for folder in ("MRPC", "STS-B") for split, rows in (("train", 16), ("dev", 8), ("test", 3))})
    out, tar = tmp_path / "study", tmp_path / "study.tar.gz"
    result = _study(["--smoke", "--corpus", str(tmp_path / "corpus" / "*.txt"), "--out", str(out),
                     "--glue_dir", str(glue), "--tasks", "mrpc stsb", "--tar", str(tar)])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    study = json.loads((out / "study.json").read_text())
    assert study["failed"] == [] and study["pretrained"] == ["albert", "widenet-e4"] and study["smoke"]
    assert study["seconds"]["total"] >= study["seconds"]["pretraining"] > 0

    report = (out / "pretraining" / "report.md").read_text()
    assert "| albert | pretrain |" in report and "| widenet-e4 | pretrain |" in report
    assert "| albert | 3 | one shared pair | 0 | 0 | 0 | 0 |" in report  # ALBERT's shared LayerNorm
    assert (out / "pretraining" / "figures" / "layer_norm_distribution.png").stat().st_size > 1000

    table = (out / "glue_table.md").read_text().splitlines()
    assert table[0] == "| Model | MRPC | STS-B | Avg |"
    assert sorted(line.split("|")[1].strip() for line in table[2:]) == ["albert", "widenet-e4"]
    for task in ("mrpc", "stsb"):
        assert "| widenet-e4/" in (out / "finetuning" / task / "report.md").read_text()
    for model in ("albert", "widenet-e4"):
        results = json.loads((out / "records" / "glue" / model / "mrpc" / "seed1" / "eval_results.json").read_text())
        assert results["model"] == model

    # every model used the one tokenizer trained for the study
    runs = [json.loads((out / "records" / "pretrain" / m / "run.json").read_text()) for m in ("albert", "widenet-e4")]
    assert {r["args"]["tokenizer"] for r in runs} == {str(out) + ".scratch/tokenizer"}

    heavy = [p for p in out.rglob("*") if p.suffix in (".pt", ".bin", ".safetensors", ".model")]
    assert heavy == []
    with tarfile.open(tar) as packed:
        names = packed.getnames()
    assert "study/pretraining/report.md" in names and not any(n.endswith((".pt", ".safetensors")) for n in names)
