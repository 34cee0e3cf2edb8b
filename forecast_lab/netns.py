"""Network namespaces for the lab and the tests: unique per-run names, commands inside them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

# The lab's runner is the product's (forecast/command.py), re-exported under the old names.
from forecast.command import CommandError as CommandError
from forecast.command import run as run

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unique_prefix(base: str = "fc") -> str:
    """A short per-run prefix, so parallel runs and leftovers never collide."""
    return f"{base}{secrets.token_hex(3)}"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with this thread inside namespace `name` (sockets made there stay there):
    reading a counter or opening a socket in 32 namespaces costs no process start each."""
    with (
        open("/proc/thread-self/ns/net", "rb") as home,
        open(os.path.join(NETNS_DIR, name), "rb") as ns,
    ):
        _setns(ns.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def ifindex(ns: str, device: str) -> int:
    """The index of `device` in namespace `ns`."""
    return int(run(["cat", f"/sys/class/net/{device}/ifindex"], netns=ns).stdout)


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def create(name: str) -> None:
    run(["ip", "netns", "add", name])
    run(["ip", "link", "set", "lo", "up"], netns=name)


def delete(name: str) -> None:
    """Delete a namespace; first end every process still inside it (only ours live there)."""
    if not exists(name):
        return
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    run(["ip", "netns", "del", name], check=False)


def add_veth(name: str, ns: str | None, peer: str, peer_ns: str | None) -> None:
    """A veth pair with each end created directly in its namespace (None: the caller's)."""
    argv = [
        "ip",
        "link",
        "add",
        name,
        *(["netns", ns] if ns else []),
        "type",
        "veth",
        "peer",
        "name",
        peer,
        *(["netns", peer_ns] if peer_ns else []),
    ]
    run(argv)


def list_with_prefix(prefix: str) -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def udp_counters(ns: str) -> dict[str, int]:
    """The namespace's UDP counters (/proc/net/snmp)."""
    with entered(ns):
        text = Path("/proc/thread-self/net/snmp").read_text()
    names, values = (ln.split()[1:] for ln in text.splitlines() if ln.startswith("Udp:"))
    return dict(zip(names, (int(v) for v in values), strict=True))
