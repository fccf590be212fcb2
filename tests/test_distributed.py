"""Process-group plumbing: a multi-node gloo run that would hang is refused with the fix."""

import socket

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
