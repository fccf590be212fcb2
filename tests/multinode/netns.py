"""Two "hosts" on one Linux machine for multi-node tests: network namespaces joined by a veth pair.

Each namespace has its own loopback and one end of the link, under the same interface name on both
(as a cluster's nodes share one). A process started in a namespace sees only that network, so traffic
between two of them crosses the link, whose byte counters say how much did. Everything made here
(the namespaces, the link, the processes started in them) is removed on leaving ``two_hosts``,
whatever happened inside. Needs root and iproute2's ``ip``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SUBNET = "10.77.0"  # private; configured only inside the namespaces made here
IFNAME = "wn0"  # each host's end of the link


def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def unavailable(probe_name: str) -> str | None:
    """Why network namespaces cannot be made here, or None when they can (tried with ``probe_name``)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian package iproute2)"
    try:
        _ip("netns", "add", probe_name)
    except RuntimeError as error:
        return f"cannot make a network namespace: {error}"
    _ip("netns", "del", probe_name)
    return None


@dataclass
class Host:
    """One namespace: its name, its address on the link and the processes started in it."""

    namespace: str
    address: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Run ``command`` in this host, output to ``log``, as the leader of a new process group (stoppable as a group)."""
        with log.open("w") as out:
            process = subprocess.Popen(["ip", "netns", "exec", self.namespace, *command], env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def link_bytes(self) -> tuple[int, int]:
        """(received, sent) bytes on this host's end of the link."""
        stats = json.loads(_ip("-n", self.namespace, "-s", "-j", "link", "show", "dev", IFNAME))[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def pids(self) -> list[int]:
        """Every process living in this namespace."""
        return [int(pid) for pid in _ip("netns", "pids", self.namespace).split()]

    def stop(self) -> None:
        """Kill what was started here (each process group), then anything else left in the namespace."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def two_hosts(prefix: str) -> Iterator[list[Host]]:
    """Namespaces ``<prefix>-0`` (10.77.0.1) and ``<prefix>-1`` (10.77.0.2) joined by a veth pair."""
    hosts = [Host(f"{prefix}-{i}", f"{SUBNET}.{i + 1}") for i in range(2)]
    made: list[Host] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a killed test run still cleans up
    try:
        for host in hosts:
            _ip("netns", "add", host.namespace)
            made.append(host)
        # Both ends are created directly inside the namespaces: nothing appears on the machine's own network.
        _ip("link", "add", IFNAME, "netns", hosts[0].namespace, "type", "veth",
            "peer", "name", IFNAME, "netns", hosts[1].namespace)
        for host in hosts:
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", IFNAME)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "link", "set", IFNAME, "up")
        yield hosts
    finally:
        problems = []
        for host in made:
            try:
                host.stop()
            except (OSError, RuntimeError) as error:
                problems.append(error)
        for host in made:
            try:
                _ip("netns", "del", host.namespace)  # takes its end of the veth pair, and so the pair, with it
            except RuntimeError as error:
                problems.append(error)
        signal.signal(signal.SIGTERM, previous)
        if problems:
            raise RuntimeError(f"cleaning up the namespaces: {problems}")
