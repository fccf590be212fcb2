"""Process-group setup and teardown for single- and multi-process runs (CPU gloo or GPU nccl)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class RankZeroError(RuntimeError):
    """A check that rank 0 made for every rank failed; rank 0 raises (and reports) the original error."""


class MissingBuildToolError(RuntimeError):
    """DeepSpeed has to compile an op for this machine and the C++ compiler (or ninja) is not installed."""


def on_rank_zero(work: Callable[[], T], share_result: bool = True) -> T | None:
    """Run ``work`` on rank 0 only and give its result to every rank (``share_result=False``: the
    other ranks get None); if it raises, every rank raises (rank 0 the original error, the others
    ``RankZeroError`` with its message), so all ranks stop alike.

    For checks that read shared files (a checkpoint's checksums, the output folder) once instead of
    once per rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return work()
    outcome: list = [None]
    error, result = None, None
    if torch.distributed.get_rank() == 0:
        try:
            result = work()
            outcome = [(True, result if share_result else None)]
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
            error, outcome = err, [(False, str(err))]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if torch.distributed.get_rank() == 0:
        return result
    ok, value = outcome[0]
    if not ok:
        raise RankZeroError(value)
    return value


def free_port() -> int:
    """An unused TCP port on localhost (for single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Launcher variables init_distributed declared for a one-process world, with what they were before:
# close_distributed restores them, so a later launch from this process does not inherit a stale port.
_DECLARED: dict[str, str | None] = {}


def init_distributed() -> None:
    """Join (or create) the default process group through DeepSpeed.

    A plain ``python script.py`` has no launcher variables; DeepSpeed would then try MPI
    discovery and fail, so a one-process world on localhost is declared instead.
    """
    import deepspeed

    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        declared = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        _DECLARED.update({k: os.environ.get(k) for k in declared})
        os.environ.update(declared)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        check_gloo_interface()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    prepare_communication_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    _remove_shm_buffer()


COMPILING_NOTICE = "DeepSpeed is compiling its CPU communication op (first run only, about a minute)..."


def prepare_communication_op() -> None:
    """Before DeepSpeed joins the process group on a CPU: it compiles its shared-memory communication
    op (``deepspeed_shm_comm``) on first use, which takes from 30 s to minutes without a word. Say so
    in one line (local rank 0) when the op is not built yet, and refuse at once, with what to install,
    when the compiler or ninja it needs is missing (DeepSpeed would fail with a long build log).
    Nothing happens where the op is built already, or where DeepSpeed does not use it (GPUs)."""
    builder = _communication_op_builder()
    if builder is None or op_is_built(builder):
        return
    check_build_tools(builder.name)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(COMPILING_NOTICE, file=sys.stderr, flush=True)


def _communication_op_builder():
    """DeepSpeed's builder of the op its communication backend loads on this accelerator (None: no such op)."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    try:
        return builder if builder is not None and builder.is_compatible(verbose=False) else None
    except Exception:  # noqa: BLE001 - DeepSpeed treats a failing probe as "not compatible" and skips the op
        return None


def op_is_built(builder) -> bool:
    """Whether DeepSpeed loads ``builder``'s op without compiling: installed prebuilt, or in torch's
    extension cache (``TORCH_EXTENSIONS_DIR``, else ~/.cache/torch_extensions) and newer than its sources."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    try:
        from torch.utils.cpp_extension import _get_build_directory  # where torch's JIT build puts the op
    except ImportError:  # another torch: the cache's place is unknown, so say nothing rather than guess
        return True
    if installed_ops.get(builder.name, False) and accelerator_name == get_accelerator()._name:
        return True
    library = Path(_get_build_directory(builder.name, verbose=False)) / f"{builder.name}.so"
    if not library.is_file():
        return False
    sources = [Path(builder.deepspeed_src_path(source)) for source in builder.sources()]
    built = library.stat().st_mtime
    return all(not source.is_file() or source.stat().st_mtime <= built for source in sources)


def check_build_tools(op_name: str) -> None:
    """Refuse, before any compute, to let DeepSpeed compile without a C++ compiler or ninja."""
    from torch.utils.cpp_extension import get_cxx_compiler

    compiler = get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise MissingBuildToolError(
            f"DeepSpeed compiles its CPU communication op ({op_name}) on the first run, but the C++ compiler "
            f"{compiler!r} is not found{' (the CXX variable)' if os.environ.get('CXX') else ''}: install g++ "
            "(e.g. apt-get install g++, or conda install gxx) and run again")
    if shutil.which("ninja") is None:
        raise MissingBuildToolError(f"DeepSpeed compiles its CPU communication op ({op_name}) on the first run "
                                    "with ninja, which is not found: pip install ninja, and run again")


def _remove_shm_buffer() -> None:
    """Unlink this rank's ``shm_buffer`` once every rank has mapped every buffer (DeepSpeed maps them
    while joining the group; the barrier waits for all): the memory stays mapped for the run and
    is freed when the last process exits, however it exits (also ``kill -9``)."""
    path = shm_buffer(torch.distributed.get_rank())
    if path.exists():  # on every rank or on none: DeepSpeed uses it when all ranks are on one host
        torch.distributed.barrier()
        path.unlink(missing_ok=True)


def check_gloo_interface() -> None:
    """Refuse a multi-node gloo run that would hang: gloo binds to the address the host name
    resolves to, and where that is a loopback address the other nodes cannot reach it."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_SIZE", "0"))
    if not local or world <= local or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    try:
        address = ipaddress.ip_address(socket.gethostbyname(socket.gethostname()))
    except (OSError, ValueError):
        return
    if address.is_loopback:
        raise RuntimeError(f"this host's name resolves to {address}, a loopback address, so the other nodes cannot "
                           "reach gloo here: set GLOO_SOCKET_IFNAME to the network interface that joins the nodes "
                           "(e.g. GLOO_SOCKET_IFNAME=eth0)")


def shm_buffer(rank: int) -> Path:
    """The /dev/shm file (~66 MB) of DeepSpeed's CPU shared-memory all-reduce for ``rank`` of this
    launch (named by user, MASTER_ADDR and MASTER_PORT). DeepSpeed never removes it: every CPU run
    of the launcher would leave one per rank behind, filling /dev/shm (memory) run after run;
    ``init_distributed`` removes it."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _release_cuda_graphs(wait: bool) -> None:
    """Free the CUDA graphs ``torch.compile`` recorded (``reduce-overhead``) while the process group
    still exists, after the GPU's work (``wait``; not when leaving on an error, where a collective a
    dead peer never joined would block it). CUDA graphs that outlive the NCCL group can hang every
    rank at exit, after the last line of Python has run; freed first, the ranks exit promptly."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if wait:
            torch.cuda.synchronize()
        torch._dynamo.reset()


def close_distributed(barrier: bool = True) -> None:
    """Free CUDA graphs, barrier, then destroy the process group: without it, multi-process runs sometimes
    die or hang at exit.

    Through DeepSpeed, which then forgets the groups it cached (data, expert parallel): a later
    ``init_distributed`` + ``deepspeed.initialize`` in the same process starts clean. Leaving on
    an error, skip the barrier: a dead peer would only add a second traceback (or a hang).
    """
    if torch.distributed.is_initialized():
        from deepspeed import comm

        _release_cuda_graphs(wait=barrier)
        if barrier:
            torch.distributed.barrier()
        if comm.is_initialized():
            comm.destroy_process_group()
        else:  # created without DeepSpeed
            torch.distributed.destroy_process_group()
    for key, value in _DECLARED.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _DECLARED.clear()


@contextmanager
def distributed_run() -> Iterator[None]:
    """Close the process group when a job ends: with a barrier on success, without on an error."""
    try:
        yield
    except BaseException:
        close_distributed(barrier=False)
        raise
    close_distributed()


def is_main_process() -> bool:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
