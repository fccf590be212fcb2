"""The pretraining job end to end: 2 ranks with expert parallelism, exact resume, export,
and the mistakes a user can make, refused before any compute."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data.english import book_text, write_jsonl

from widenet_ds import WideNetConfig, WideNetForPreTraining
from widenet_ds.config import ConfigError
from widenet_ds.data import CorpusError
from widenet_ds.engine.checkpointing import (
    CheckpointError,
    complete_checkpoints,
    full_state_dict,
)
from widenet_ds.jobs.pretrain import run

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
COMMON = ["--preset", "debug", "--vocab_size", "300", "--max_seq_length", "64", "--log_every", "1",
          "--eval_batches", "4"]


def _corpus(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "book.txt").write_text(book_text() * 3, encoding="utf-8")
    jsonl = write_jsonl(directory / "extra.jsonl")
    with jsonl.open("a", encoding="utf-8") as f:
        f.write("{this line is not json\n")  # a bad line must be skipped, not crash the run
    return [str(directory / "*.txt"), str(directory / "*.jsonl")]


def _launch(args: list[str], ranks: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    if ranks == 1:
        command = [sys.executable, str(ROOT / "launch" / "pretrain.py")]
    else:
        command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(29500 + os.getpid() % 1000),
                   str(ROOT / "launch" / "pretrain.py")]
    result = subprocess.run(command + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _records(output_dir: Path) -> list[dict]:
    """The metric records of metrics.jsonl (not its events: start, resume, warnings)."""
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r]


def _events(output_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" in r]


def _fast_config(tmp_path: Path, name: str) -> Path:
    """A ds_configs/ file with a learning rate high enough to see the tiny model learn in a few steps."""
    raw = json.loads((ROOT / "ds_configs" / name).read_text())
    raw["optimizer"]["params"]["lr"] = raw["scheduler"]["params"]["warmup_max_lr"] = 2e-2
    raw["scheduler"]["params"]["warmup_num_steps"] = 2
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory) -> Path:
    """A 2-rank, ep_size=2, ZeRO-2 pretraining run of 16 steps with activation checkpointing (shared below)."""
    tmp_path = tmp_path_factory.mktemp("ep2")
    out = tmp_path / "run"
    _launch(COMMON + ["--train_files", *_corpus(tmp_path / "corpus"), "--output_dir", str(out),
                      "--deepspeed_config", str(_fast_config(tmp_path, "pretrain_cpu_ep2.json")),
                      "--max_steps", "16", "--save_every", "8", "--eval_every", "8", "--profile", "3:4",
                      "--activation_checkpointing"], ranks=2)  # non-reentrant: ZeRO-2 + shared weights works
    return out


@pytest.mark.distributed
def test_two_ranks_with_expert_parallelism_train_checkpoint_and_export(ep2_run):
    out = ep2_run
    records = _records(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 0.3, f"loss did not go down: {first:.3f} -> {last:.3f}"
    record = train[-1]
    assert {"mlm_loss", "sop_loss", "aux_loss", "lr", "tokens_per_s", "dropped_fraction"} <= set(record)
    assert all(0 <= r["data_wait_fraction"] < 1 for r in train)
    assert all(r["model_tflop_per_s_per_gpu"] > 0 for r in train)
    assert len(record["expert_load"]) == 3 and all(len(row) == 4 for row in record["expert_load"])
    assert all(abs(sum(row) - 1) < 1e-4 for row in record["expert_load"])
    evals = [r for r in records if "eval_mlm_accuracy" in r]
    assert [r["step"] for r in evals] == [8, 16] and 0 <= evals[-1]["eval_sop_accuracy"] <= 1

    checkpoints = complete_checkpoints(out / "checkpoints")
    assert [c.name for c in checkpoints] == ["step_00000008", "step_00000016"]
    expert_files = sorted(p.name for p in checkpoints[-1].glob("layer_0_expert_*"))
    assert len(expert_files) == 4, "each rank saved its two experts under their global ids"
    for name in ("model_config.json", "ds_config.json", "run.json", "tokenizer/tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "ds_config.json").read_text())["moe"]["ep_size"] == 2

    model = WideNetForPreTraining.from_pretrained(out / "final").eval()
    assert model.config.moe["ep_size"] == 1 and model.config.vocab_size == 300
    saved = full_state_dict(checkpoints[-1])
    for name, param in model.state_dict().items():
        if name in saved:
            torch.testing.assert_close(param, saved[name].float(), msg=name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    batch = tokenizer(["The harbour master counted the boats.", "Rain fell on the quiet town."],
                      ["They came home at dusk.", "The river rose by morning."], return_tensors="pt",
                      padding=True)
    output = model(**batch)
    assert output.prediction_logits.shape[-1] == 300 and torch.isfinite(output.prediction_logits).all()


@pytest.mark.distributed
def test_profile_of_the_asked_steps_on_every_rank(ep2_run):
    import gzip

    for rank in (0, 1):
        table = (ep2_run / "profile" / f"ops_rank{rank}.txt").read_text()
        assert table.startswith("optimizer steps 3..4 (2): ")
        # the MoE's expert matmuls and the expert-parallel all-to-all ran inside the profiled steps
        assert "_ExpertLinear" in table and "_AllToAll" in table
        with gzip.open(ep2_run / "profile" / f"trace_rank{rank}.json.gz", "rt") as f:
            events = json.load(f)["traceEvents"]
        assert any(e.get("name") == "aten::bmm" for e in events)


def _checkpoint_logits(checkpoint: Path, ds_json: str, out: Path, ranks: int, save_dir: Path | None = None):
    script = ROOT / "tests" / "tools" / "eval_checkpoint.py"
    args = [str(checkpoint), str(ROOT / "ds_configs" / ds_json), str(out)] + ([str(save_dir)] if save_dir else [])
    if ranks == 1:
        command = [sys.executable, str(script)]
    else:
        command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(29600 + os.getpid() % 1000),
                   str(script)]
    result = subprocess.run(command + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.distributed
def test_checkpoint_saved_with_ep2_loads_with_ep1_and_back(ep2_run, tmp_path):
    from tools.eval_checkpoint import fixed_batch

    checkpoint = complete_checkpoints(ep2_run / "checkpoints")[-1]
    exported = WideNetForPreTraining.from_pretrained(ep2_run / "final").eval()
    with torch.no_grad():
        expected = exported(**fixed_batch(exported.config.vocab_size)).prediction_logits
    ep1 = _checkpoint_logits(checkpoint, "pretrain_cpu_smoke.json", tmp_path / "ep1.pt", ranks=1,
                             save_dir=tmp_path / "ep1_checkpoints")
    torch.testing.assert_close(ep1, expected, atol=1e-5, rtol=1e-5)
    resaved = complete_checkpoints(tmp_path / "ep1_checkpoints")[-1]
    assert resaved.name == checkpoint.name and json.loads((resaved / "config.json").read_text())["moe"]["ep_size"] == 1
    back = _checkpoint_logits(resaved, "pretrain_cpu_ep2.json", tmp_path / "ep2.pt", ranks=2)
    torch.testing.assert_close(back, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_resume_continues_with_the_losses_of_an_uninterrupted_run(tmp_path):
    """Resumed with DataLoader workers (the first run had none): the same batches, the same losses."""
    out = tmp_path / "run"
    args = COMMON + ["--train_files", *_corpus(tmp_path / "corpus"), "--output_dir", str(out),
                     "--max_steps", "8", "--save_every", "4", "--eval_every", "0", "--keep_last", "5"]
    _launch(args)
    uninterrupted = {r["step"]: r["loss"] for r in _records(out)}
    # As if the run had died after step 6: the step-8 checkpoint never completed.
    (out / "checkpoints" / "step_00000008" / "complete.json").unlink()
    (out / "metrics.jsonl").unlink()
    _launch(args + ["--resume", "auto", "--loader_workers", "2"])  # worker processes mask the same batches
    resumed = {r["step"]: r["loss"] for r in _records(out)}
    assert sorted(resumed) == [5, 6, 7, 8]
    for step, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[step], abs=1e-6), step

    with pytest.raises(CheckpointError, match="(?s)another architecture.*num_experts: checkpoint 4 vs this run 2"):
        run(args + ["--resume", "auto", "--override", "num_experts=2"])


@pytest.mark.slow
def test_a_compiled_run_checkpoints_exports_and_resumes_eager(tmp_path):
    """--compile model (inductor, here on CPU): same first loss as eager up to router noise (compiled
    code draws other random numbers), checkpoints and export under the usual names, and an eager run
    resumes from its checkpoint."""
    args = COMMON + ["--train_files", *_corpus(tmp_path / "corpus"), "--save_every", "2", "--eval_every", "0"]
    _launch(args + ["--max_steps", "2", "--output_dir", str(tmp_path / "eager")])
    compiled = tmp_path / "compiled"
    result = _launch(args + ["--max_steps", "2", "--output_dir", str(compiled), "--compile", "model"], timeout=400)
    assert "compiled the model (model)" in result.stdout + result.stderr
    first = {name: _records(tmp_path / name)[0]["loss"] for name in ("eager", "compiled")}
    assert first["compiled"] == pytest.approx(first["eager"], rel=2e-2)
    _, info = WideNetForPreTraining.from_pretrained(compiled / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # no "_orig_mod." names
    _launch(args + ["--max_steps", "3", "--output_dir", str(compiled), "--resume", "auto"])
    assert [r["step"] for r in _records(compiled) if "loss" in r][-1] == 3


def test_user_mistakes_are_refused_before_any_compute(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    with pytest.raises(CorpusError, match="nothing"):
        run(["--train_files", str(tmp_path / "nothing" / "*.txt"), "--output_dir", str(tmp_path / "a")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        run(["--train_files", str(tmp_path / "empty.txt"), "--output_dir", str(tmp_path / "b")])
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_acumulation_steps": 1,
                                    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    with pytest.raises(ConfigError, match="did you mean 'gradient_accumulation_steps'"):
        run(COMMON + ["--train_files", *corpus, "--deepspeed_config", str(bad_json),
                      "--output_dir", str(tmp_path / "c")])
    with pytest.raises(ConfigError, match="unknown field 'num_expert'"):
        run(COMMON + ["--train_files", *corpus, "--override", "num_expert=8", "--output_dir", str(tmp_path / "d")])
    assert not (tmp_path / "d" / "tokenizer").exists(), "refused before the tokenizer was trained"
    with pytest.raises(ConfigError, match="vocab_size=999 does not match the tokenizer's 300"):
        run(COMMON + ["--train_files", *corpus, "--override", "vocab_size=999", "--output_dir", str(tmp_path / "e")])
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        run(COMMON + ["--train_files", *corpus, "--resume", str(tmp_path / "missing"),
                      "--output_dir", str(tmp_path / "f")])
    accumulating = tmp_path / "accumulating.json"  # bf16 without immediate_grad_update keeps param.grad
    accumulating.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                                        "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="overwrite the gradients this engine keeps between the 2 micro-batches"):
        run(COMMON + ["--train_files", *corpus, "--deepspeed_config", str(accumulating), "--compile",
                      "model:reduce-overhead", "--output_dir", str(tmp_path / "g")])
    assert not (tmp_path / "g" / "tokenizer").exists(), "refused before the tokenizer was trained"
    with pytest.raises(ConfigError, match=r"--profile 9:12 ends after the run's last step \(10\)"):
        run(COMMON + ["--train_files", *corpus, "--max_steps", "10", "--profile", "9:12",
                      "--output_dir", str(tmp_path / "h")])
    assert not (tmp_path / "h" / "tokenizer").exists(), "refused before the tokenizer was trained"
    for bad in ("0:2", "5:3", "3-4", "x"):
        with pytest.raises(SystemExit):
            run(COMMON + ["--train_files", *corpus, "--profile", bad, "--output_dir", str(tmp_path / "i")])


def _wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float = 180) -> None:
    """Block until the run has logged ``step`` (or fail if it ended or took too long)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if metrics.is_file() and any(json.loads(line).get("step", 0) >= step and "loss" in json.loads(line)
                                     for line in metrics.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


@pytest.mark.distributed
def test_kill_9_of_one_rank_then_resume_auto_loses_nothing_after_the_checkpoint(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    config = str(ROOT / "ds_configs" / "pretrain_cpu_ep2.json")
    args = COMMON + ["--train_files", *corpus, "--deepspeed_config", config, "--max_steps", "50",
                     "--save_every", "5", "--eval_every", "0", "--keep_last", "10"]
    _launch(args + ["--output_dir", str(tmp_path / "reference")], ranks=2)
    reference = {r["step"]: r["loss"] for r in _records(tmp_path / "reference")}

    out = tmp_path / "crashed"
    port = str(29700 + os.getpid() % 1000)
    command = ["deepspeed", "--num_gpus", "2", "--master_port", port, str(ROOT / "launch" / "pretrain.py")]
    process = subprocess.Popen(command + args + ["--output_dir", str(out)], cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_step(out / "metrics.jsonl", 12, process)
        rank1 = subprocess.run(["pgrep", "-f", f"pretrain.py --local_rank=1 .*{out}"], capture_output=True,
                               text=True).stdout.split()
        assert len(rank1) == 1, rank1
        os.kill(int(rank1[0]), 9)
        assert process.wait(timeout=120) != 0, "the launcher reports the crash"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    assert not (out / "final").exists(), "killed mid-run"
    last = complete_checkpoints(out / "checkpoints")[-1]
    resumed_from = int(last.name.split("_")[1])
    assert resumed_from >= 10
    (out / "metrics.jsonl").unlink()
    _launch(args + ["--output_dir", str(out), "--resume", "auto"], ranks=2)
    resumed = {r["step"]: r["loss"] for r in _records(out)}
    assert sorted(resumed) == list(range(resumed_from + 1, 51)), "continues right after the checkpoint"
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step


@pytest.mark.slow
def test_a_full_disk_during_save_fails_loudly_and_keeps_the_previous_checkpoint(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # One debug checkpoint is ~0.8 MB: the first save fits in 1.2 MB, the second does not.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(checkpoints)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        command = [sys.executable, str(ROOT / "launch" / "pretrain.py")]
        args = COMMON + ["--train_files", *_corpus(tmp_path / "corpus"), "--output_dir", str(tmp_path / "run"),
                         "--max_steps", "4", "--save_every", "2", "--eval_every", "0", "--keep_last", "5"]
        result = subprocess.run(command + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
        assert result.returncode != 0
        assert "is the disk full?" in result.stderr and "step_00000002, is intact" in result.stderr
        assert [c.name for c in complete_checkpoints(checkpoints)] == ["step_00000002"]
        from widenet_ds.engine.checkpointing import resolve_resume

        newest = resolve_resume("auto", checkpoints)
        assert newest.name == "step_00000002" and "widenet.embeddings.word_embeddings.weight" in full_state_dict(newest)
    finally:
        subprocess.run(["umount", str(checkpoints)], check=False)


@pytest.mark.distributed
def test_export_on_demand_from_any_checkpoint(ep2_run, tmp_path):
    first = complete_checkpoints(ep2_run / "checkpoints")[0]
    for source, out in ((first, tmp_path / "at8"), (ep2_run, tmp_path / "latest")):
        result = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), str(source), str(out)],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    at8 = WideNetForPreTraining.from_pretrained(tmp_path / "at8").state_dict()
    latest = WideNetForPreTraining.from_pretrained(tmp_path / "latest").state_dict()
    final = WideNetForPreTraining.from_pretrained(ep2_run / "final").state_dict()
    assert all(torch.equal(latest[k], final[k]) for k in final), "output_dir exports its newest checkpoint"
    assert any(not torch.equal(at8[k], final[k]) for k in final), "step 8 differs from step 16"
    assert (tmp_path / "at8" / "tokenizer_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("action", ["stop", "skip"])
def test_a_real_nan_loss_stops_or_skips_as_configured(tmp_path, action):
    raw = json.loads((ROOT / "ds_configs" / "pretrain_cpu_smoke.json").read_text())
    raw["optimizer"]["params"]["lr"] = raw["scheduler"]["params"]["warmup_max_lr"] = 1e4  # diverges by step 5
    raw["scheduler"]["params"]["warmup_num_steps"] = 1
    raw["gradient_clipping"] = 0.0
    raw["nonfinite_loss"] = {"action": action, "max_consecutive": 3}
    config = tmp_path / "diverging.json"
    config.write_text(json.dumps(raw))
    command = [sys.executable, str(ROOT / "launch" / "pretrain.py")]
    args = COMMON + ["--train_files", *_corpus(tmp_path / "corpus"), "--output_dir", str(tmp_path / "run"),
                     "--deepspeed_config", str(config), "--max_steps", "10", "--save_every", "2",
                     "--eval_every", "0"]
    result = subprocess.run(command + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "non-finite loss (nan here) at step 5 on 1 rank(s)" in result.stderr
    if action == "stop":
        assert "stopping (nonfinite_loss.action is 'stop')" in result.stderr
        assert "skipping a batch" not in result.stderr
    else:
        assert result.stderr.count("skipping a batch") == 3
        assert "4 bad batches in a row, more than nonfinite_loss.max_consecutive (3)" in result.stderr
    assert [c.name for c in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002",
                                                                                       "step_00000004"]


def test_the_metric_window_keeps_its_own_copy_of_a_steps_outputs():
    """Under CUDA graphs (--compile model:reduce-overhead) a step's outputs live in buffers that the next
    step overwrites: the window must not hold them."""
    from types import SimpleNamespace

    from widenet_ds.jobs.loop import MetricWindow

    window = MetricWindow()
    loss, counts = torch.tensor(2.0), torch.tensor([[3.0, 1.0]])
    window.add(SimpleNamespace(loss=loss, expert_counts=counts), tokens=8)
    loss.fill_(100.0), counts.fill_(100.0)  # the next replay writes its outputs into the same buffers
    window.add(SimpleNamespace(loss=torch.tensor(4.0), expert_counts=torch.tensor([[1.0, 1.0]])), tokens=8)
    record = window.record(step=2, lr=1e-3, world=1)
    assert record["loss"] == 3.0 and record["expert_load"] == [pytest.approx([2 / 3, 1 / 3])]


def test_the_metric_window_counts_the_model_flops_of_real_tokens_and_kept_routes():
    """model_tflop_per_s_per_gpu: the FLOPs of the benchmark's formula for the real tokens of each micro-batch, the
    MLM head at its labelled positions and the routes the router kept (the padding and dropped routes left out)."""
    from types import SimpleNamespace

    from widenet_ds.jobs.loop import MetricWindow
    from widenet_ds.modeling.flops import forward_flops

    config = WideNetConfig.from_preset("debug")  # 4 experts, top-2
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0  # 26 real tokens of 32
    batch = {"input_ids": torch.zeros(2, 16, dtype=torch.long), "attention_mask": mask,
             "mlm_positions": torch.tensor([[1, 4, 6], [2, -1, -1]])}
    counts = torch.tensor([[20.0, 12.0, 10.0, 10.0]] * layers)  # 52 routes per call (26 tokens x 2)
    dropped = torch.full((layers,), 0.25)  # 39 kept
    window = MetricWindow(flop_config=config)
    window.add(SimpleNamespace(loss=torch.tensor(2.0), expert_counts=counts, dropped_fraction=dropped), 26, batch)
    dense = forward_flops(config, 2, 16, 0.0, mlm_positions=2.0, tokens=26)  # 4 positions / 2 rows
    expected = 3 * (dense + layers * 4 * h * i * 39)
    assert float(window.flops) == pytest.approx(expected, rel=1e-6)
    record = window.record(step=1, lr=1e-3, world=1)
    assert record["model_tflop_per_s_per_gpu"] > 0
    assert forward_flops(config, 2, 16, 39.0, tokens=32) == forward_flops(config, 2, 16, 39.0)  # all real: as before


def test_evaluate_scores_the_held_out_batches():
    """MLM accuracy over the masked positions, SOP accuracy and the mean loss of the first eval_batches batches;
    the sums stay on the engine's device (NCCL reduces no host tensors)."""
    from types import SimpleNamespace

    from widenet_ds.config import WideNetConfig
    from widenet_ds.jobs.pretrain import evaluate

    torch.manual_seed(0)
    model = WideNetForPreTraining(WideNetConfig.from_preset("debug", vocab_size=50))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(5, 50, (4, 12), generator=g)
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                        "sentence_order_label": torch.randint(0, 2, (4,), generator=g)})
    def engine(**batch):  # the DeepSpeed engine's part here: forward, device, mode switches
        return model(**batch)

    engine.device, engine.eval, engine.train = torch.device("cpu"), model.eval, model.train
    job = SimpleNamespace(engine=engine, args=SimpleNamespace(eval_batches=2),
                          data=SimpleNamespace(eval_batches=lambda: iter(batches)))
    result = evaluate(job)
    assert model.training, "back in training mode"

    model.eval()
    correct = total = sop_correct = 0
    losses = []
    with torch.no_grad():
        for batch in batches[:2]:
            out = model(**batch)
            masked = batch["labels"] != -100
            correct += (out.prediction_logits.argmax(-1)[masked] == batch["labels"][masked]).sum().item()
            total += masked.sum().item()
            sop_correct += (out.sop_logits.argmax(-1) == batch["sentence_order_label"]).sum().item()
            losses.append(out.loss.item())
    assert result == pytest.approx({"eval_mlm_accuracy": correct / total, "eval_sop_accuracy": sop_correct / 8,
                                    "eval_loss": sum(losses) / 2})


@pytest.mark.slow
def test_a_run_without_checkpoints_ends_cleanly(tmp_path):
    """--save_every 0: the run trains, saves and exports nothing, and exits 0 (the export step has nothing to export and says so)."""
    out = tmp_path / "run"
    result = _launch(COMMON + ["--train_files", *_corpus(tmp_path / "corpus"), "--output_dir", str(out),
                               "--max_steps", "2", "--save_every", "0", "--eval_every", "0"])
    assert "nothing exported" in result.stderr
    assert [r["step"] for r in _records(out)] == [1, 2]
    assert not (out / "final").exists() and not complete_checkpoints(out / "checkpoints")


def test_profile_steps_read_a_range_or_one_step():
    import argparse

    from widenet_ds.jobs.args import profile_steps

    assert profile_steps("41:43") == (41, 43) and profile_steps("7") == (7, 7)
    for bad in ("0:2", "5:3", "3-4", "x", ":4"):
        with pytest.raises(argparse.ArgumentTypeError, match="FIRST:LAST"):
            profile_steps(bad)
