"""strongSwan over VICI: a `list-sas` snapshot, then the events that patch it.

Events are registered before the snapshot is taken, so nothing falls between the two; an event
that the snapshot already reflects is applied again harmlessly (the SA table's updates are
idempotent). When charon goes away the caller reconnects with back-off and takes a fresh
snapshot: the table is always derived, never replayed from memory.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import vici

EVENTS = ["child-updown", "child-rekey", "ike-updown", "ike-rekey", "ike-update"]
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
POLL_S = 0.05


class ViciUnavailable(ConnectionError):
    """charon's VICI socket cannot be reached or the connection broke."""


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ViciUnavailable(f"VICI socket {path}: {exc.strerror or exc}") from None
    return sock


def list_sas(path: Path) -> list[Any]:
    sock = _connect(path)
    try:
        return list(vici.Session(sock).list_sas())
    except (OSError, vici.exception.SessionException) as exc:
        raise ViciUnavailable(f"list-sas on {path}: {exc}") from None
    finally:
        sock.close()


class EventStream:
    """A registered event listener: iterate for (event, payload), (None, None) when idle."""

    def __init__(self, path: Path, idle_timeout: float = 1.0) -> None:
        self.path = path
        self.idle_timeout = idle_timeout
        self.sock = _connect(path)
        # vici's listen() waits a whole timeout in its first step, after registering; a short
        # one keeps start-up (and READY) from waiting for nothing; idle ticks are spaced below.
        self._gen = vici.Session(self.sock).listen(EVENTS, timeout=POLL_S)
        first = self._next()  # registers every event with charon (and may already yield one)
        self.pending: list[tuple[str | None, Any]] = [first] if first[0] is not None else []
        self._last_yield = time.monotonic()

    def _next(self) -> tuple[str | None, Any]:
        try:
            label, msg = next(self._gen)
        except StopIteration:
            raise ViciUnavailable(f"VICI event stream on {self.path} ended") from None
        except (OSError, vici.exception.SessionException) as exc:
            raise ViciUnavailable(f"VICI event stream on {self.path}: {exc}") from None
        if label is None:
            return None, None
        return (label.decode() if isinstance(label, bytes) else str(label)), msg

    def __iter__(self) -> Iterator[tuple[str | None, Any]]:
        while True:
            item = self.pending.pop(0) if self.pending else self._next()
            now = time.monotonic()
            if item[0] is None and now - self._last_yield < self.idle_timeout:
                continue  # (None, None) once per idle_timeout, not once per poll
            self._last_yield = now
            yield item

    def ready(self) -> bool:
        """Is another event already waiting? (The daemon applies a burst in one step.)"""
        if self.pending:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def close(self) -> None:
        # The generator first, while its socket is open: its clean-up unregisters the events,
        # and run later (at garbage collection) on a closed socket it would print a traceback.
        # If charon went away, closing the socket below ends the registration anyway.
        with contextlib.suppress(OSError, vici.exception.SessionException, ValueError):
            self._gen.close()
        self.sock.close()
