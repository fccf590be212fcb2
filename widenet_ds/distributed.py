"""Process-group setup and teardown for single- and multi-process runs (CPU gloo or GPU nccl)."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class RankZeroError(RuntimeError):
    """A check that rank 0 made for every rank failed; rank 0 raises (and reports) the original error."""


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
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    _remove_shm_buffer()


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
def distributed_session() -> Iterator[None]:
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
