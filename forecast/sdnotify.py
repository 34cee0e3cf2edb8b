"""systemd's notify protocol (sd_notify(3)): one datagram per message to $NOTIFY_SOCKET.

READY=1 goes out once the programs are attached and the first SA snapshot is applied; STATUS=
says what the daemon is doing; WATCHDOG=1 is sent at half of $WATCHDOG_USEC from the main loop,
so a hung loop gets the daemon restarted. Without $NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


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

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(lines).encode(), self.address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: removing filters, rules, routes, maps")

    def tick(self, now: float | None = None) -> None:
        """Call often; pings the watchdog when half its interval has passed."""
        if not self.watchdog_s:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog_s:
            self.send("WATCHDOG=1")
            self._last_ping = now
