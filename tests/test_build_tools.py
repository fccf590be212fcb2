"""Before DeepSpeed compiles its CPU communication op: one line saying so when the op is not in
torch's extension cache yet, nothing when it is, and a refusal naming what to install when the C++
compiler or ninja is missing. The cache (TORCH_EXTENSIONS_DIR) and the compiler (CXX) are set per
test; DeepSpeed's build itself never runs here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from widenet_ds import distributed
from widenet_ds.distributed import COMPILING_NOTICE, MissingBuildToolError, prepare_communication_op

ROOT = Path(__file__).resolve().parent.parent
OP = "deepspeed_shm_comm"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.setenv("CXX", sys.executable)  # any existing program: the compiler is looked up, never run
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return cache


def _build_in(cache: Path) -> Path:
    """A library where torch's JIT build leaves it (the op's folder in the cache), newer than its sources."""
    library = cache / OP / f"{OP}.so"
    library.parent.mkdir(parents=True, exist_ok=True)
    library.write_bytes(b"\x7fELF")
    return library


def test_the_op_not_built_yet_announces_the_compilation_in_one_line(empty_cache, capsys):
    prepare_communication_op()
    captured = capsys.readouterr()
    assert captured.err == COMPILING_NOTICE + "\n" and captured.out == ""
    assert "first run only" in COMPILING_NOTICE


def test_only_local_rank_zero_announces_it(empty_cache, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    prepare_communication_op()
    assert capsys.readouterr().err == ""


def test_a_built_op_needs_no_notice_and_no_compiler(empty_cache, capsys, monkeypatch, tmp_path):
    _build_in(empty_cache)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    prepare_communication_op()
    assert capsys.readouterr().err == ""


def test_a_library_older_than_the_ops_sources_counts_as_not_built(empty_cache, capsys):
    os.utime(_build_in(empty_cache), (0, 0))  # 1970: before DeepSpeed's sources were installed
    prepare_communication_op()
    assert capsys.readouterr().err == COMPILING_NOTICE + "\n"


def test_without_a_compiler_the_run_is_refused_with_what_to_install(empty_cache, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(MissingBuildToolError, match=r"C\+\+ compiler .*no-such-c\+\+.* not found.*install g\+\+"):
        prepare_communication_op()
    assert capsys.readouterr().err == ""  # refused instead of announcing a build that would fail


def test_without_ninja_the_run_is_refused_with_what_to_install(empty_cache, monkeypatch):
    real_which = distributed.shutil.which
    monkeypatch.setattr(distributed.shutil, "which", lambda name: None if name == "ninja" else real_which(name))
    with pytest.raises(MissingBuildToolError, match="pip install ninja"):
        prepare_communication_op()


def _pretrain_without_a_compiler(tmp_path: Path,
                                 blocked: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, Path]:
    """The pretraining entry point with CXX pointing nowhere; ``blocked``: packages made unimportable (a
    folder of stand-ins first on PYTHONPATH), as in an environment that does not have them."""
    stand_ins = tmp_path / "not_installed"
    for name in blocked:
        (stand_ins / name).mkdir(parents=True)
        (stand_ins / name / "__init__.py").write_text(f'raise ModuleNotFoundError("No module named {name}", '
                                                      f'name="{name}")\n')
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(stand_ins), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    env.pop("WIDENET_DS_DEBUG", None)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--preset", "debug",
                           "--output_dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    return done, out


def _assert_refused_in_one_line(done: subprocess.CompletedProcess, out: Path) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "install g++" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and COMPILING_NOTICE not in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_the_job_refuses_in_one_message_before_writing_anything(tmp_path):
    """End to end: the pretraining entry point without a compiler exits 1 with one error line."""
    _assert_refused_in_one_line(*_pretrain_without_a_compiler(tmp_path))


@pytest.mark.slow
def test_the_refusal_needs_no_package_of_another_job(tmp_path):
    """Pillow (the image job's) and matplotlib (reports') are not installed with the package: the
    pretraining job's refusal is the same one line without them."""
    _assert_refused_in_one_line(*_pretrain_without_a_compiler(tmp_path, blocked=("PIL", "matplotlib")))
