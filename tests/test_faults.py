"""What users hand the jobs and what goes wrong around them: planted code in a checkpoint never runs,
a damaged file is caught, a mistake is one message before any compute, no run's files are lost,
and a pre-empted run saves, exits 0 and resumes with the losses of an uninterrupted one."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data.english import book_text, write_jsonl
from glue_fixtures import GLUE_FILES, write_glue_layout

from widenet_ds.config import ConfigError
from widenet_ds.engine.checkpointing import (
    CheckpointError,
    complete_checkpoints,
    export_to_folder,
    resolve_resume,
    verify_checkpoint,
)
from widenet_ds.jobs.pretrain import run

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
COMMON = ["--preset", "debug", "--vocab_size", "300", "--max_seq_length", "64", "--log_every", "1",
          "--eval_batches", "2"]
SMOKE = ROOT / "ds_configs" / "pretrain_cpu_smoke.json"


def _corpus(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "book.txt").write_text(book_text() * 3, encoding="utf-8")
    write_jsonl(directory / "extra.jsonl")
    return [str(directory / "*.txt"), str(directory / "*.jsonl")]


def _script(name: str, args: list[str], timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / name), *args], cwd=ROOT, env=env or ENV, text=True,
                          capture_output=True, timeout=timeout)


def _refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with one error message (no traceback) that holds every needle."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("error: ") == 1, result.stderr[-3000:]
    message = result.stderr[result.stderr.index("error: "):]
    for needle in needles:
        assert needle in message, message
    return message


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A pretraining run of 4 steps with checkpoints at steps 2 and 4 (copied, never changed, by the tests)."""
    root = tmp_path_factory.mktemp("trained")
    run(COMMON + ["--train_files", *_corpus(root / "corpus"), "--output_dir", str(root / "run"), "--max_steps", "4",
                  "--save_every", "2", "--eval_every", "0"])
    return root / "run"


def _copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns(".widenet.lock"))
    return out


class _Payload:
    """Pickles as a call of ``open(marker, "w")``: loading it with plain ``torch.load`` creates the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(checkpoint: Path, name: str, marker: Path) -> None:
    """Replace one file of a checkpoint by a payload, and record its new size and sha256 in complete.json
    as a careful attacker would (the checksums catch accidents, not malice)."""
    from widenet_ds.safe_io import sha256_file

    target = checkpoint / name
    original = torch.load(target, weights_only=False)
    torch.save({**original, "payload": _Payload(marker)} if isinstance(original, dict) else _Payload(marker), target)
    marker_file = checkpoint / "complete.json"
    saved = json.loads(marker_file.read_text())
    saved["files"][name] = {"size": target.stat().st_size, "sha256": sha256_file(target)}
    marker_file.write_text(json.dumps(saved))


# --- 1. no code runs from a file a user was handed ----------------------------------------------


@pytest.mark.parametrize("planted", ["mp_rank_00_model_states.pt", "layer_0_expert_1_mp_rank_00_model_states.pt",
                                     "rng_rank0.pt", "expp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_planted_payload_never_runs_on_export_resume_or_fine_tuning(trained, tmp_path, planted):
    out = _copy(trained, tmp_path)
    checkpoint = out / "checkpoints" / "step_00000004"
    marker = tmp_path / "PWNED"
    _plant(checkpoint, planted, marker)

    _refused(_script("export.py", [str(checkpoint), str(tmp_path / "export")]), planted, "refused to load",
             "io.open")
    _refused(_script("pretrain.py", COMMON + ["--output_dir", str(out), "--resume", str(checkpoint),
                                              "--max_steps", "6"]), planted, "io.open")
    glue = write_glue_layout(tmp_path / "glue", {k: v for k, v in GLUE_FILES.items() if k.startswith("MRPC")})
    _refused(_script("finetune_glue.py", ["--task", "mrpc", "--data_dir", str(glue), "--model_name_or_path",
                                          str(checkpoint), "--output_dir", str(tmp_path / "ft"), "--max_steps", "2",
                                          "--deepspeed_config", str(ROOT / "ds_configs" / "finetune_cpu_smoke.json")]),
             planted, "io.open")
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "export").exists() and not (tmp_path / "ft").exists()


def test_deepspeeds_own_checkpoint_reads_go_through_the_safe_loader(trained, tmp_path):
    """Even a file the checks never saw (DeepSpeed reads every file through its checkpoint engine)."""
    from widenet_ds import WideNetConfig, WideNetForPreTraining
    from widenet_ds.distributed import close_distributed, init_distributed
    from widenet_ds.engine.build import initialize_engine
    from widenet_ds.engine.ds_config import load_run_config
    from widenet_ds.safe_io import UnsafeFileError

    marker = tmp_path / "PWNED"
    torch.save({"module": _Payload(marker)}, tmp_path / "evil.pt")
    init_distributed()
    try:
        config = WideNetConfig.from_preset("debug", vocab_size=300)
        engine, _, _ = initialize_engine(WideNetForPreTraining(config), load_run_config(SMOKE, max_steps=4))
        with pytest.raises(UnsafeFileError, match="io.open"):
            engine.checkpoint_engine.load(str(tmp_path / "evil.pt"), map_location="cpu")
        assert engine.checkpoint_engine.load(str(trained / "checkpoints" / "step_00000004" /
                                                 "mp_rank_00_model_states.pt"))["global_steps"] == 4
    finally:
        close_distributed()
    assert not marker.exists()


def test_the_safe_loader_refuses_old_format_and_raw_pickles_too(tmp_path):
    import pickle

    from widenet_ds.safe_io import UnsafeFileError, load_pt

    marker = tmp_path / "PWNED"
    torch.save({"a": _Payload(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with open(tmp_path / "raw.pt", "wb") as handle:
        pickle.dump({"a": _Payload(marker)}, handle)
    for name in ("legacy.pt", "raw.pt"):
        with pytest.raises(UnsafeFileError, match="refused to load"):
            load_pt(tmp_path / name)
    assert not marker.exists()
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "plain.pt")
    assert load_pt(tmp_path / "plain.pt")["step"] == 3


# --- 2. corruption is detected ------------------------------------------------------------------


def _flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size, one bit changed, in the middle of the weights
    file.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_by_export_resume_auto_skips_it_and_a_path_is_refused(trained, tmp_path):
    out = _copy(trained, tmp_path)
    newest = out / "checkpoints" / "step_00000004"
    _flip_a_byte(newest / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="file mp_rank_00_model_states.pt is corrupt: its sha256 differs"):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointError, match="is corrupt"):
        export_to_folder(newest, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    assert resolve_resume("auto", out / "checkpoints").name == "step_00000002"
    with pytest.raises(CheckpointError, match="is corrupt"):
        resolve_resume(str(newest), out / "checkpoints")
    path, _ = export_to_folder(out, tmp_path / "newest-good")  # a run's folder: its newest good checkpoint
    assert path.name == "step_00000002"
    _flip_a_byte(out / "checkpoints" / "step_00000002" / "rng_rank0.pt")
    with pytest.raises(CheckpointError, match="every complete checkpoint .* failed its checks"):
        resolve_resume("auto", out / "checkpoints")


def test_resume_auto_logs_the_skipped_checkpoint_and_continues_from_the_previous(trained, tmp_path, caplog):
    out = _copy(trained, tmp_path)
    _flip_a_byte(out / "checkpoints" / "step_00000004" / "layer_0_expert_2_mp_rank_00_model_states.pt")
    run(COMMON + ["--output_dir", str(out), "--resume", "auto", "--max_steps", "5", "--save_every", "5",
                  "--eval_every", "0", "--train_files", *_corpus(tmp_path / "corpus")])
    events = [r for r in _records(out) if r.get("event") in ("resume", "warning")]
    assert any("skips step_00000004" in r.get("message", "") and "layer_0_expert_2" in r["message"] for r in events)
    assert [r for r in events if r["event"] == "resume"][-1]["step"] == 2
    assert [r["step"] for r in _records(out) if "loss" in r][-3:] == [3, 4, 5]


def test_checkpoints_record_sha256_of_every_file(trained):
    marker = json.loads((trained / "checkpoints" / "step_00000004" / "complete.json").read_text())
    from widenet_ds.safe_io import sha256_file

    files = sorted(p.name for p in (trained / "checkpoints" / "step_00000004").iterdir() if p.name != "complete.json")
    assert sorted(marker["files"]) == files
    for name, entry in marker["files"].items():
        assert entry["sha256"] == sha256_file(trained / "checkpoints" / "step_00000004" / name)
    assert marker["hashed"]["bytes"] == sum(e["size"] for e in marker["files"].values())


# --- 3. no silent wrong result ------------------------------------------------------------------


def _json(tmp_path: Path, name: str, **changes) -> Path:
    raw = json.loads(SMOKE.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        block = raw
        for parent in parents:
            block = block[parent]
        block[key] = value
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return path


def test_settings_that_train_wrongly_are_refused_before_anything_is_written(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    cases = {
        "ends_early": ({"scheduler__params__total_num_steps": 50}, "total_num_steps is 50 but the run has 200 steps"),
        "no_steps": ({"scheduler__params__total_num_steps": 0}, "total_num_steps must be a positive integer"),
        "c0": ({"moe__capacity_factor": 0}, "capacity_factor must be a number > 0"),
        "neg_lr": ({"optimizer__params__lr": -1e-3}, "optimizer.params.lr must be a number > 0"),
        "betas": ({"optimizer__params__betas": [0.9, 1.0]}, "betas must be two numbers in [0, 1)"),
    }
    for name, (changes, needle) in cases.items():
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            run(COMMON + ["--train_files", *corpus, "--output_dir", str(tmp_path / name), "--deepspeed_config",
                          str(_json(tmp_path, f"{name}.json", **changes)), "--max_steps", "200"])
        assert not (tmp_path / name).exists(), f"{name}: refused before anything was written"
    nan = tmp_path / "nan.json"
    nan.write_text(SMOKE.read_text().replace('"lr": 0.001', '"lr": NaN'))
    with pytest.raises(ConfigError, match="lr must be a number > 0, got nan"):
        run(COMMON + ["--train_files", *corpus, "--output_dir", str(tmp_path / "n"), "--deepspeed_config", str(nan)])
    with pytest.raises(ConfigError, match="--max_seq_length 600 is longer than the model's 128 positions"):
        run(COMMON + ["--train_files", *corpus, "--output_dir", str(tmp_path / "long"), "--max_seq_length", "600"])
    for bad in (["--max_steps", "0"], ["--max_seq_length", "0"], ["--eval_batches", "-1"]):
        with pytest.raises(SystemExit):
            run(COMMON + ["--train_files", *corpus, "--output_dir", str(tmp_path / "x"), *bad])
    assert not (tmp_path / "long").exists() and not (tmp_path / "x").exists()


def test_a_capacity_that_drops_routes_is_warned_once_and_recorded(tmp_path):
    out = tmp_path / "run"
    run(COMMON + ["--train_files", *_corpus(tmp_path / "corpus"), "--output_dir", str(out), "--max_steps", "2",
                  "--eval_every", "0", "--save_every", "0",
                  "--deepspeed_config", str(_json(tmp_path, "c.json", moe__capacity_factor=0.25))])
    warnings = [r["message"] for r in _records(out) if r.get("event") == "warning"]
    dropping = [w for w in warnings if "capacity_factor 0.25" in w]
    assert len(dropping) == 1 and "a uniform router would drop 75% of them" in dropping[0]


# --- 4. no file lost ----------------------------------------------------------------------------


def test_a_fresh_start_never_overwrites_a_run(trained, tmp_path):
    out = _copy(trained, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    args = COMMON + ["--output_dir", str(out), "--max_steps", "4", "--save_every", "2", "--eval_every", "0",
                     "--train_files", *_corpus(tmp_path / "corpus")]
    with pytest.raises(Exception, match="already holds a run .*checkpoints.*--resume auto.*--overwrite_output_dir"):
        run(args)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before
    with pytest.raises(Exception, match="contradict"):
        run(args + ["--resume", "auto", "--overwrite_output_dir"])
    run(args + ["--overwrite_output_dir"])  # the explicit way to start over
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert steps == [1, 2, 3, 4], "the earlier run's records were deleted, not appended to"


def test_pretraining_and_fine_tuning_never_share_a_folder(tmp_path):
    from widenet_ds.jobs.run_dir import OutputDirError, prepare_output_dir

    folder = tmp_path / "glue"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"job": "finetune_glue"}))
    with pytest.raises(OutputDirError, match="holds a finetune_glue run; this is pretrain"):
        prepare_output_dir(folder, "pretrain", resuming=True, overwrite=False)
    legacy = tmp_path / "pretraining"  # written before run.json named its job
    (legacy / "checkpoints" / "step_00000002").mkdir(parents=True)
    with pytest.raises(OutputDirError, match="holds a pretrain run; this is finetune_glue"):
        prepare_output_dir(legacy, "finetune_glue", resuming=False, overwrite=True)
    assert (legacy / "checkpoints" / "step_00000002").is_dir()


def test_a_second_job_in_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    from widenet_ds.jobs.run_dir import LOCK, OutputDirError, OutputDirLock

    folder = tmp_path / "run"
    with OutputDirLock(folder, "pretrain"):
        with pytest.raises(OutputDirError, match=f"in use by pretrain \\(pid {os.getpid()} on {socket.gethostname()}"):
            OutputDirLock(folder, "pretrain").acquire()
    assert not (folder / LOCK).exists(), "released"

    sleeper = subprocess.Popen(["sleep", "30"])
    try:  # a live process on this host holds it
        from widenet_ds.jobs.run_dir import _process_start

        (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid,
                                               "start": _process_start(sleeper.pid), "job": "pretrain"}))
        with pytest.raises(OutputDirError, match=f"pid {sleeper.pid}"):
            OutputDirLock(folder, "finetune_glue").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputDirLock(folder, "pretrain") as lock:  # that process is gone: taken over with a warning
        assert lock.held and json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    (folder / LOCK).write_text(json.dumps({"host": "node-17", "pid": 4242, "job": "pretrain"}))
    with pytest.raises(OutputDirError, match=f"pid 4242 on node-17.*if that job is gone, delete {folder / LOCK}"):
        OutputDirLock(folder, "pretrain").acquire()


def test_two_jobs_started_into_one_folder_one_refuses(tmp_path):
    """Two real processes: the second finds the first's lock and refuses; the first's run is intact."""
    corpus = _corpus(tmp_path / "corpus")
    args = COMMON + ["--train_files", *corpus, "--output_dir", str(tmp_path / "run"), "--max_steps", "100000",
                     "--save_every", "0", "--eval_every", "0"]
    first = subprocess.Popen([sys.executable, str(ROOT / "launch" / "pretrain.py"), *args], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(tmp_path / "run" / "metrics.jsonl", 1, first)
        second = _script("pretrain.py", args + ["--resume", "auto"], timeout=600)
        _refused(second, "is in use by pretrain", f"pid {first.pid}")
    finally:
        first.terminate()
        first.wait(timeout=60)


def test_resume_without_the_runs_tokenizer_is_refused(trained, tmp_path):
    out = _copy(trained, tmp_path)
    shutil.rmtree(out / "tokenizer")
    args = COMMON + ["--output_dir", str(out), "--resume", "auto", "--max_steps", "6",
                     "--train_files", *_corpus(tmp_path / "corpus")]
    with pytest.raises(CheckpointError, match="the run's tokenizer .* is missing"):
        run(args)
    assert not (out / "tokenizer").exists(), "no new tokenizer was trained over it"
    other = tmp_path / "other-tokenizer"
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(trained / "tokenizer").save_pretrained(other)
    tokenizer_json = json.loads((other / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"][0]["content"] = "<blank>"  # same size, another vocabulary
    (other / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(CheckpointError, match="trained with another tokenizer"):
        run(args + ["--tokenizer", str(other)])


def test_export_never_overwrites_a_file_a_checkpoint_or_another_folder(trained, tmp_path):
    checkpoint = trained / "checkpoints" / "step_00000004"
    (tmp_path / "a_file").write_text("keep me")
    _refused(_script("export.py", [str(checkpoint), str(tmp_path / "a_file")]), "is a file")
    assert (tmp_path / "a_file").read_text() == "keep me"
    out = _copy(trained, tmp_path)
    config_before = (out / "checkpoints" / "step_00000002" / "config.json").read_text()
    with pytest.raises(CheckpointError, match="is \\(or is inside\\) a checkpoint or a run's folder"):
        export_to_folder(checkpoint, out / "checkpoints" / "step_00000002")
    with pytest.raises(CheckpointError, match="checkpoint or a run's folder"):
        export_to_folder(checkpoint, out)
    assert (out / "checkpoints" / "step_00000002" / "config.json").read_text() == config_before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty and holds no model"):
        export_to_folder(checkpoint, tmp_path / "notes")
    export_to_folder(checkpoint, tmp_path / "export")
    with pytest.raises(CheckpointError, match="holds an earlier export: pass --overwrite"):
        export_to_folder(checkpoint, tmp_path / "export")
    export_to_folder(trained / "checkpoints" / "step_00000002", tmp_path / "export", overwrite=True)


# --- 5. errors read as errors -------------------------------------------------------------------


def test_refusals_are_one_message_without_a_traceback(trained, tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    _refused(_script("pretrain.py", COMMON + ["--train_files", *corpus, "--output_dir", str(tmp_path / "a"),
                                              "--deepspeed_config", str(_json(tmp_path, "b.json",
                                                                              optimizer__params__betas=[1.5, 0.9]))]),
             "invalid DeepSpeed config", "betas must be two numbers in [0, 1)")
    _refused(_script("pretrain.py", COMMON + ["--output_dir", str(tmp_path / "b"), "--tokenizer",
                                              str(tmp_path / "no-such-tokenizer"), "--train_files", *corpus]),
             str(tmp_path / "no-such-tokenizer"))
    _refused(_script("finetune_glue.py", ["--task", "mrpc", "--model_name_or_path", "preset:debug", "--data_dir",
                                          str(write_glue_layout(tmp_path / "glue", {k: v for k, v in GLUE_FILES.items()
                                                                                   if k.startswith("MRPC")})),
                                          "--tokenizer", str(tmp_path / "missing"),
                                          "--output_dir", str(tmp_path / "ft")]),
             "--tokenizer", "no such folder")
    traceback = _script("export.py", [str(tmp_path / "nothing"), str(tmp_path / "e")],
                        env={**ENV, "WIDENET_DS_DEBUG": "1"})
    assert traceback.returncode != 0 and "Traceback" in traceback.stderr


def test_a_read_only_checkpoints_folder_is_refused_before_training(trained, tmp_path):
    out = _copy(trained, tmp_path)
    checkpoints = out / "checkpoints"
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(checkpoints), str(checkpoints)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only (needs root): {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(checkpoints)], check=True)
        result = _script("pretrain.py", COMMON + ["--output_dir", str(out), "--resume", "auto", "--max_steps", "6",
                                                  "--train_files", *_corpus(tmp_path / "corpus")])
        _refused(result, f"cannot write into {checkpoints}", "Read-only file system")
        assert "disk full" not in result.stderr
    finally:
        subprocess.run(["umount", str(checkpoints)], check=False)


# --- 6. pre-emption -----------------------------------------------------------------------------


def _wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if metrics.is_file() and any(json.loads(line).get("step", 0) >= step and "loss" in json.loads(line)
                                     for line in metrics.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out) if "loss" in r}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_at_the_step_boundary_exits_0_and_resumes_exactly(tmp_path, sig):
    corpus = _corpus(tmp_path / "corpus")
    args = COMMON + ["--train_files", *corpus, "--max_steps", "60", "--save_every", "0", "--eval_every", "0"]
    _script("pretrain.py", args + ["--output_dir", str(tmp_path / "reference")])
    reference = _losses(tmp_path / "reference")
    assert sorted(reference) == list(range(1, 61))

    out = tmp_path / "preempted"
    process = subprocess.Popen([sys.executable, str(ROOT / "launch" / "pretrain.py"), *args, "--output_dir",
                                str(out)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    _wait_for_step(out / "metrics.jsonl", 5, process)
    process.send_signal(sig)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 0, stderr[-3000:]
    saved, = complete_checkpoints(out / "checkpoints")
    stopped = int(saved.name.split("_")[1])
    assert 5 <= stopped < 60 and f"stopped by {sig.name} at step {stopped}" in stderr
    assert not (out / "final").exists(), "a stopped run is not exported"
    assert [r for r in _records(out) if r.get("event") == "stopped"][0]["step"] == stopped
    assert max(_losses(out)) == stopped

    _script("pretrain.py", args + ["--output_dir", str(out), "--resume", "auto"])
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 61))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step


def _deepspeed(args: list[str], port: int, **kw) -> subprocess.Popen:
    launcher = Path(sys.executable).parent / "deepspeed"
    return subprocess.Popen([str(launcher), "--num_gpus", "2", "--master_port", str(port),
                             str(ROOT / "launch" / "pretrain.py"), "--deepspeed_config",
                             str(ROOT / "ds_configs" / "pretrain_cpu_ep2.json"), *args],
                            cwd=ROOT, env=ENV, text=True, start_new_session=True, **kw)


def test_sigterm_to_the_deepspeed_launcher_saves_every_rank_and_resumes_exactly(tmp_path):
    """SIGTERM to the whole process group, as SLURM sends it: each rank gets it from the scheduler and
    again from DeepSpeed's per-node launcher, which passes it on to rank 0 and waits for it before it
    signals rank 1. The repeat must not cancel the save; both ranks save the same step (the request
    travels with the step's all-reduce) and the run resumes with the losses of an uninterrupted one.
    The launcher itself exits 1 whatever its ranks did, so the test reads the checkpoint, not the code."""
    from widenet_ds.distributed import free_port

    corpus = _corpus(tmp_path / "corpus")
    args = COMMON + ["--train_files", *corpus, "--max_steps", "40", "--save_every", "0", "--eval_every", "0"]
    reference = _deepspeed(args + ["--output_dir", str(tmp_path / "reference")], free_port(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert reference.wait(timeout=300) == 0
    out = tmp_path / "preempted"
    launcher = _deepspeed(args + ["--output_dir", str(out)], free_port(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    try:
        _wait_for_step(out / "metrics.jsonl", 4, launcher)
        os.killpg(launcher.pid, signal.SIGTERM)
        output = launcher.communicate(timeout=180)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    saved, = complete_checkpoints(out / "checkpoints")
    stopped = int(saved.name.split("_")[1])
    assert 4 <= stopped < 40 and "stopped by SIGTERM at step" in output, output[-3000:]
    experts = sorted(p.name for p in saved.rglob("*expert*"))
    assert len(experts) >= 2, f"each rank saved its experts: {experts}"
    assert not (out / "final").exists()
    resumed = _deepspeed(args + ["--output_dir", str(out), "--resume", "auto"], free_port(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()[-3000:]
    expected, losses = _losses(tmp_path / "reference"), _losses(out)
    assert sorted(losses) == list(range(1, 41))
    for step, loss in losses.items():
        assert loss == pytest.approx(expected[step], abs=1e-6), step


def test_a_grid_keeps_finished_cells_and_epochs_0_is_refused(tmp_path, monkeypatch):
    from widenet_ds.jobs import finetune, glue_grid
    from widenet_ds.jobs.run_dir import mark_finished

    done = tmp_path / "grid" / "m" / "mrpc" / "seed1"
    done.mkdir(parents=True)
    (done / "run.json").write_text(json.dumps({"job": "finetune_glue"}))
    mark_finished(done)
    calls = []
    monkeypatch.setattr(finetune, "finetune", lambda args: calls.append(args.output_dir))
    folders = glue_grid.run_grid(["m=preset:debug"], ["mrpc"], [1, 2], tmp_path / "grid", [])
    assert [str(f) for f in folders[1:]] == calls == [str(tmp_path / "grid" / "m" / "mrpc" / "seed2")]
    for bad in (["--epochs", "0"], ["--epochs", "nan"], ["--max_steps", "0"]):
        with pytest.raises(SystemExit):
            finetune.build_parser().parse_args(["--task", "mrpc", "--model_name_or_path", "preset:debug", *bad])
