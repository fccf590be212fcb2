"""The output folder of a run: one job at a time, never a fresh start over a run's records, never
another kind of job's folder.

- **Lock.** ``<output_dir>/.widenet.lock`` names the host, pid and job holding the folder; a second
  job refuses to start, naming them. A lock left by a process that is gone (same host, pid dead or
  reused) is taken over with a warning. A lock from another host cannot be checked from here: the
  message says how to remove it once that job is known to be gone.
- **A folder that holds a run** (checkpoints, metrics, results) is refused to a fresh start: the
  message names ``--resume auto`` (pretraining) and ``--overwrite_output_dir``, which deletes the
  run's records and starts again. Inputs a run prepared for itself (the built-in corpus, the data
  cache) are kept.
- **Job kind.** ``run.json`` records which job wrote the folder; pretraining into a fine-tuning
  folder (or the reverse) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..distributed import is_main_process

if TYPE_CHECKING:
    import argparse

    from ..config import WideNetConfig
    from ..engine.ds_config import RunConfig

log = logging.getLogger(__name__)

# The repository's root: the default DeepSpeed JSONs live in its ds_configs/, git_hash reads it.
REPO_ROOT = Path(__file__).resolve().parents[2]

LOCK = ".widenet.lock"
RUN_RECORD = "run.json"
# What a run writes into its output folder (a fresh start would overwrite or mix with them).
RECORDS = ("checkpoints", "metrics.jsonl", RUN_RECORD, "model_config.json", "ds_config.json", "tensorboard",
           "final", "profile", "report", "best", "eval_results.json", "dev_predictions.json", "submission",
           "predictions.json", "nbest_predictions.json", "null_odds.json")
# What a run prepared for itself and a later fresh start may reuse; --overwrite_output_dir deletes it too.
PREPARED = ("tokenizer",)
# Files that tell a folder's job when run.json does not (folders written before it recorded the job).
_JOB_EVIDENCE = {"pretrain": ("checkpoints", "final"), "finetune_glue": ("eval_results.json", "best")}


class OutputDirError(RuntimeError):
    """An output folder this job must not write into; the message says why and what to do."""


def _process_start(pid: int) -> str | None:
    """The start time of a process on this host (guards against a reused pid), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "unknown"
        return "unknown"


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _is_alive(holder: dict[str, Any]) -> bool:
    start = _process_start(int(holder.get("pid", -1)))
    return start is not None and (start == holder.get("start") or "unknown" in (start, holder.get("start")))


class OutputDirLock:
    """Holds ``<output_dir>/.widenet.lock`` for the life of a job (``with`` or ``acquire``/``release``)."""

    def __init__(self, output_dir: str | Path, job: str):
        self.path = Path(output_dir) / LOCK
        self.job = job
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {**_holder(), "job": self.job}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(mine, handle)
            self.held = True
            return
        raise OutputDirError(f"could not lock {self.path.parent}: another job took it at the same moment")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            holder = {}
        where = f"{holder.get('job', 'a job')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, " \
                f"since {holder.get('since', '?')})"
        if holder.get("host") != socket.gethostname():
            raise OutputDirError(f"{self.path.parent} is in use by {where}: two jobs in one output folder overwrite "
                                 f"each other's checkpoints and records. Use another --output_dir, or, if that job "
                                 f"is gone, delete {self.path}")
        if _is_alive(holder):
            raise OutputDirError(f"{self.path.parent} is in use by {where}: two jobs in one output folder overwrite "
                                 "each other's checkpoints and records. Wait for it, or use another --output_dir")
        log.warning("taking over the lock of %s from %s, which is no longer running", self.path.parent, where)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        try:
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
        self.held = False

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def recorded_job(output_dir: Path) -> str | None:
    """The job that wrote ``output_dir``: from its run.json, else from the files it left."""
    record = output_dir / RUN_RECORD
    if record.is_file():
        try:
            job = json.loads(record.read_text()).get("job")
        except (OSError, json.JSONDecodeError, AttributeError):
            job = None
        if job:
            return job
    for job, evidence in _JOB_EVIDENCE.items():
        if any((output_dir / name).exists() for name in evidence):
            return job
    return None


def run_records(output_dir: Path) -> list[str]:
    """The records of an earlier run in ``output_dir`` (an empty checkpoints folder does not count)."""
    found = []
    for name in RECORDS:
        path = output_dir / name
        if name == "checkpoints":
            if path.is_dir() and any(path.iterdir()):
                found.append(name)
        elif path.exists():
            found.append(name)
    return found


def check_writable(folder: Path) -> None:
    """Refuse a folder this process cannot create files in, before any compute."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputDirError(f"cannot write into {folder} ({err.strerror or err}): make it writable or choose "
                             "another --output_dir") from None


def prepare_output_dir(output_dir: Path, job: str, resuming: bool, overwrite: bool,
                       resume_hint: bool = False) -> None:
    """Check (and with ``overwrite``, clear) ``output_dir`` for a run of ``job``.

    ``resuming``: the run continues from a checkpoint (its records are continued, not replaced).
    ``resume_hint``: the job can resume (``--resume auto`` is named in the refusal)."""
    if resuming and overwrite:
        raise OutputDirError("--resume and --overwrite_output_dir contradict each other: continue the run, or "
                             "start it again")
    other = recorded_job(output_dir)
    if other is not None and other != job:
        raise OutputDirError(f"{output_dir} holds a {other} run; this is {job}: writing here would overwrite its "
                             "records. Choose another --output_dir")
    records = run_records(output_dir)
    if records and not resuming:
        if not overwrite:
            options = "continue it with --resume auto, " if resume_hint else ""
            raise OutputDirError(f"{output_dir} already holds a run ({', '.join(records)}): {options}start again "
                                 "from the beginning with --overwrite_output_dir (deletes those), or choose another "
                                 "--output_dir")
        records += [name for name in PREPARED if (output_dir / name).exists()]
        log.warning("--overwrite_output_dir: deleting the earlier run's %s in %s", ", ".join(records), output_dir)
        for name in records:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    check_writable(output_dir)
    if (output_dir / "checkpoints").is_dir():
        check_writable(output_dir / "checkpoints")


def claim_output_dir(output_dir: Path, job: str, resuming: bool, overwrite: bool,
                     resume_hint: bool = False) -> OutputDirLock:
    """Lock ``output_dir`` for this job, then ``prepare_output_dir``; returns the held lock (release it
    when the job ends; it is released here if the checks refuse the folder)."""
    created = not output_dir.exists()
    lock = OutputDirLock(output_dir, job)
    lock.acquire()
    try:
        prepare_output_dir(output_dir, job, resuming, overwrite, resume_hint)
    except BaseException:
        lock.release()
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # a refused run leaves nothing behind
        raise
    return lock


def mark_finished(output_dir: Path) -> None:
    """Record in run.json that the job ran to its end (rank 0): grids of runs skip finished ones."""
    from ..distributed import is_main_process

    record = output_dir / RUN_RECORD
    if is_main_process() and record.is_file():
        found = json.loads(record.read_text())
        record.write_text(json.dumps({**found, "finished": True}, indent=2))


def is_finished(output_dir: Path) -> bool:
    """Whether a job ran to its end in ``output_dir`` (``mark_finished``)."""
    try:
        return bool(json.loads((output_dir / RUN_RECORD).read_text()).get("finished"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def git_hash() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"



def write_run_record(output_dir: Path, config: WideNetConfig, run: RunConfig, args: argparse.Namespace,
                     job: str) -> None:
    """The resolved model config, DeepSpeed config, the job's name and the git hash, in output_dir (rank 0)."""
    if not is_main_process():
        return
    config.to_json_file(output_dir / "model_config.json", use_diff=False)
    (output_dir / "ds_config.json").write_text(json.dumps(run.to_dict(), indent=2))
    record = {"job": job, "git": git_hash(), "args": {k: v for k, v in vars(args).items() if k != "deepspeed"},
              "world_size": run.world_size, "precision": run.precision, "zero_stage": run.zero_stage,
              "optimizer": run.optimizer["type"],
              "lamb_trust_ratio": "per parameter tensor (widenet_ds.engine.optim.Lamb)"
              if run.optimizer["type"] == "Lamb" else None}
    (output_dir / "run.json").write_text(json.dumps(record, indent=2))
