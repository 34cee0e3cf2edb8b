"""Pinned BPF objects through libbpf (the library bcc itself links), from any process.

The one way this project reads and writes its maps: the daemon (fill SA slots, adopt them after
a restart), `status` and the metrics all go through a pinned map's file descriptor, so none of
them needs bcc, a compile or the daemon's memory. Programs are pinned too: a restarted daemon
adopts them without compiling (forecast.datapath).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

from forecast import layout
from forecast.layout import Direction, DropReason

_lib: ctypes.CDLL | None = None
BPF_ANY = 0


class PinnedError(RuntimeError):
    """A pinned object is missing or unusable; the message names it."""


def _libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
        lib.bpf_map_update_elem.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_uint64,
        ]
        _lib = lib
    return _lib


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def obj_get(path: Path) -> int:
    """A new file descriptor for the object pinned at `path`."""
    fd = int(_libbpf().bpf_obj_get(str(path).encode()))
    if fd < 0:
        raise PinnedError(f"{path}: {_errno_text()}")
    return fd


def obj_pin(fd: int, path: Path) -> None:
    if _libbpf().bpf_obj_pin(fd, str(path).encode()) != 0:
        raise PinnedError(f"cannot pin at {path}: {_errno_text()}")


def possible_cpus() -> int:
    """Per-CPU map values hold one slot per *possible* CPU (not online)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class PinnedMap:
    """One pinned map with u32 keys."""

    def __init__(self, path: Path) -> None:
        try:
            self.fd = obj_get(path)
        except PinnedError as exc:
            raise PinnedError(f"{exc} (is the data path loaded?)") from None
        self.path = path

    def lookup(self, key: int, value: Any) -> bool:
        k = ctypes.c_uint32(key)
        rc: int = _libbpf().bpf_map_lookup_elem(self.fd, ctypes.byref(k), ctypes.byref(value))
        return rc == 0

    def update(self, key: int, value: Any) -> None:
        k = ctypes.c_uint32(key)
        if _libbpf().bpf_map_update_elem(self.fd, ctypes.byref(k), ctypes.byref(value), BPF_ANY):
            raise PinnedError(f"{self.path.name}[{key}]: update failed: {_errno_text()}")

    def delete(self, key: int) -> None:
        k = ctypes.c_uint32(key)
        if _libbpf().bpf_map_delete_elem(self.fd, ctypes.byref(k)) and (
            ctypes.get_errno() != errno.ENOENT
        ):
            raise PinnedError(f"{self.path.name}[{key}]: delete failed: {_errno_text()}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PinnedCounters:
    """Counters and drops, summed over CPUs: what `status` and the metrics read."""

    def __init__(self, counters: PinnedMap, drops: PinnedMap) -> None:
        self.counters, self.drops = counters, drops
        self.ncpu = possible_cpus()

    @classmethod
    def open(cls, maps_dir: Path) -> PinnedCounters:
        counters = PinnedMap(maps_dir / "counters")
        try:
            return cls(counters, PinnedMap(maps_dir / "drops"))
        except PinnedError:
            counters.close()
            raise

    def slot(self, slot: int) -> dict[Direction, tuple[int, int]]:
        out = {}
        for d in Direction:
            values = (layout.FcCounter * self.ncpu)()
            if not self.counters.lookup(layout.counter_key(slot, d), values):
                raise PinnedError(f"counters[{slot}, {d.name}] unreadable")
            out[d] = (sum(v.packets for v in values), sum(v.bytes for v in values))
        return out

    def zero(self, slot: int) -> None:
        for d in Direction:
            self.counters.update(layout.counter_key(slot, d), (layout.FcCounter * self.ncpu)())

    def drop_counts(self) -> dict[DropReason, int]:
        out = {}
        for r in DropReason:
            values = (ctypes.c_uint64 * self.ncpu)()
            if not self.drops.lookup(r.value, values):
                raise PinnedError(f"drops[{r.name}] unreadable")
            out[r] = int(sum(values))
        return out

    def close(self) -> None:
        self.counters.close()
        self.drops.close()
