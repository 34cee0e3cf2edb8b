"""What the daemon says to and asks of systemd; outside systemd every call is a no-op.

- The notify protocol (sd_notify(3)): READY=1 once the programs are attached and the first SA
  snapshot is applied; RELOADING=1 around a reload; STATUS= what the daemon is doing;
  WATCHDOG=1 at half of $WATCHDOG_USEC from the main loop, so a hung loop is restarted.
- The file-descriptor store: the LAN group memberships belong to a socket, and closing it
  leaves the groups (a NIC filters those MACs out again, a snooping switch stops sending them).
  Across a restart the socket waits in systemd's store and the next daemon takes it back.
- Stop or restart: both arrive as SIGTERM. The job systemd is running for our unit tells them
  apart: `stop` removes the data path, `restart` (and a package upgrade, which restarts) hands
  it over to the next daemon.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

SD_LISTEN_FDS_START = 3
HANDOVER_JOBS = ("restart", "try-restart", "reload-or-restart", "try-reload-or-restart")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@'.
        self.address = ("\0" + path[1:]) if path.startswith("@") else path
        usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        pid = int(env.get("WATCHDOG_PID", "0") or 0)
        self.watchdog_s = usec / 2e6 if usec and (not pid or pid == os.getpid()) else 0.0
        self._last_ping = 0.0

    def send(self, *lines: str, fds: list[int] | None = None) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            ancillary = []
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sock.sendmsg(["\n".join(lines).encode()], ancillary, 0, self.address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: newer systemd wants it with RELOADING=1; older ones ignore it.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def store_fd(self, name: str, fd: int) -> bool:
        """Keep `fd` in systemd's store under `name` (FileDescriptorStoreMax= > 0)."""
        if not self.address:
            return False
        self.send("FDSTORE=1", f"FDNAME={name}", fds=[fd])
        return True

    def drop_fd(self, name: str) -> None:
        self.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    @contextlib.contextmanager
    def keepalive(self) -> Iterator[None]:
        """Ping the watchdog from a thread while the block runs: set-up may compile for longer
        than WatchdogSec on a slow machine, and the main loop does not run yet."""
        if not self.watchdog_s:
            yield
            return
        done = threading.Event()

        def ping() -> None:
            while not done.wait(self.watchdog_s):
                self.send("WATCHDOG=1")

        thread = threading.Thread(target=ping, name="watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def tick(self, now: float | None = None) -> None:
        """Call often; pings the watchdog when half its interval has passed."""
        if not self.watchdog_s:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog_s:
            self.send("WATCHDOG=1")
            self._last_ping = now


def listen_fds(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """The descriptors systemd passed us (sd_listen_fds(3)), by FDNAME."""
    env = os.environ if env is None else env
    if int(env.get("LISTEN_PID", "0") or 0) != os.getpid():
        return {}
    count = int(env.get("LISTEN_FDS", "0") or 0)
    names = env.get("LISTEN_FDNAMES", "").split(":")
    out = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out[names[i] if i < len(names) and names[i] else f"fd{i}"] = fd
    return out


def own_unit(cgroup_file: Path = Path("/proc/self/cgroup")) -> str | None:
    """The service unit this process runs in, from its cgroup; None outside systemd."""
    if not os.environ.get("INVOCATION_ID"):
        return None
    try:
        text = cgroup_file.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        for part in reversed(path.split("/")):
            if part.endswith(".service"):
                return part
    return None


def running_job(unit: str) -> str | None:
    """The type of the job systemd runs for `unit` now ("stop", "restart", ...), or None."""
    try:
        out = subprocess.run(
            ["systemctl", "list-jobs", "--no-legend", "--no-pager", "--plain"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2]
    return None


def stop_is_a_restart() -> bool:
    """SIGTERM under systemd: True when systemd will start us again right away."""
    unit = own_unit()
    return unit is not None and running_job(unit) in HANDOVER_JOBS


def process_age() -> float:
    """Seconds since this process started (the kernel's start time, so the interpreter's own
    start-up counts too)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return max(0.0, uptime - started)
