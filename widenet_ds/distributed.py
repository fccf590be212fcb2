"""Process-group setup and teardown for single- and multi-process runs (CPU gloo or GPU nccl)."""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    """An unused TCP port on localhost (for single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join (or create) the default process group through DeepSpeed.

    A plain ``python script.py`` has no launcher variables; DeepSpeed would then try MPI
    discovery and fail, so a one-process world on localhost is declared instead.
    """
    import deepspeed

    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def close_distributed() -> None:
    """Barrier, then destroy the process group: without it, multi-process runs sometimes die at exit.

    Through DeepSpeed, which then forgets the groups it cached (data, expert parallel): a later
    ``init_distributed`` + ``deepspeed.initialize`` in the same process starts clean.
    """
    if torch.distributed.is_initialized():
        from deepspeed import comm

        torch.distributed.barrier()
        if comm.is_initialized():
            comm.destroy_process_group()
        else:  # created without DeepSpeed
            torch.distributed.destroy_process_group()
