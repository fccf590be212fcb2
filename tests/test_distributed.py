"""Process-group plumbing: a multi-node gloo run that would hang is refused with the fix."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from widenet_ds.distributed import check_gloo_interface


@pytest.mark.parametrize("env,resolved,refused", [
    ({"WORLD_SIZE": "2", "LOCAL_SIZE": "1"}, "127.0.1.1", True),  # multi-node, host name on loopback
    ({"WORLD_SIZE": "2", "LOCAL_SIZE": "1", "GLOO_SOCKET_IFNAME": "eth0"}, "127.0.1.1", False),
    ({"WORLD_SIZE": "2", "LOCAL_SIZE": "1"}, "10.1.2.3", False),
    ({"WORLD_SIZE": "2", "LOCAL_SIZE": "2"}, "127.0.1.1", False),  # one node: loopback is fine
])
def test_gloo_interface_check(monkeypatch, env, resolved, refused):
    for key in ("WORLD_SIZE", "LOCAL_SIZE", "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(socket, "gethostbyname", lambda name: resolved)
    if refused:
        with pytest.raises(RuntimeError, match="set GLOO_SOCKET_IFNAME"):
            check_gloo_interface()
    else:
        check_gloo_interface()


def test_a_one_process_world_leaves_no_launcher_variables_behind(monkeypatch):
    import os

    from widenet_ds.distributed import close_distributed, init_distributed

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    init_distributed()
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"]
    close_distributed()
    # A job launched from this process afterwards must not inherit a port this process used.
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)


def test_cuda_graphs_are_freed_while_the_process_group_still_exists(monkeypatch):
    """CUDA graphs (``reduce-overhead``) that outlive the NCCL group can hang every rank at exit, after its
    last line of Python: they are freed before the group goes. Here (no GPU) the CUDA calls are stood in
    for; what is checked is the order: graphs freed, then the group destroyed; on an error without
    waiting for the GPU."""
    import torch

    from widenet_ds.distributed import close_distributed, init_distributed

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("synchronize"))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append(("graphs freed", torch.distributed.is_initialized())))
    for barrier in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a gloo group on this CPU
        init_distributed()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        events.clear()
        close_distributed(barrier=barrier)
        assert events == ["synchronize", ("graphs freed", True)] if barrier else [("graphs freed", True)]
        assert not torch.distributed.is_initialized()


@pytest.mark.distributed
@pytest.mark.parametrize("ending", ["clean", "rank 1 dies"])
def test_a_cpu_launch_leaves_no_deepspeed_shared_memory_buffers(tmp_path, ending):
    """DeepSpeed's CPU all-reduce puts a ~66 MB file per rank in /dev/shm and never removes it;
    init_distributed unlinks them once mapped, so none is left even by a rank that dies."""
    from widenet_ds.distributed import free_port

    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, sys, torch
        import deepspeed.comm.comm as comm
        from widenet_ds.distributed import close_distributed, init_distributed
        init_distributed()
        assert comm.cdb.shm_comm_op is not None, "DeepSpeed's shared-memory all-reduce is in use"
        total = torch.ones(3) * (torch.distributed.get_rank() + 1)
        torch.distributed.all_reduce(total)  # through the (unlinked) shared memory
        assert total.tolist() == [3.0, 3.0, 3.0]
        if sys.argv[-1] == "die" and torch.distributed.get_rank() == 1:
            os._exit(3)
        close_distributed()
    """))
    port = free_port()
    launcher = Path(sys.executable).parent / "deepspeed"
    result = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(port), str(script),
                             "die" if ending != "clean" else "live"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (result.returncode == 0) == (ending == "clean"), result.stdout[-2000:] + result.stderr[-2000:]
    assert "exits with return code = 3" in result.stdout + result.stderr or ending == "clean"
    assert not [f for f in os.listdir("/dev/shm") if f"_{port}_" in f and f.startswith("deepspeed_allreduce")]
