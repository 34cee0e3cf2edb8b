"""Read the daemon's pinned maps from any process (`forecast-bpf status`) through libbpf (the
library bcc itself links): no compile, and status works as long as the maps are pinned,
without asking the daemon anything."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from forecast import layout
from forecast.layout import Direction, DropReason

_lib: ctypes.CDLL | None = None


class PinnedError(RuntimeError):
    """A pinned map is missing or unreadable; the message names it."""


def _libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        _lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        _lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return _lib


def possible_cpus() -> int:
    """Per-CPU map values hold one slot per *possible* CPU (not online)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class PinnedMap:
    def __init__(self, path: Path) -> None:
        fd = _libbpf().bpf_obj_get(str(path).encode())
        if fd < 0:
            err = ctypes.get_errno()
            raise PinnedError(f"{path}: {os.strerror(err)} (is the daemon running?)")
        self.fd = fd
        self.path = path

    def lookup(self, key: int, value: ctypes.Array[Any] | ctypes.Structure) -> bool:
        k = ctypes.c_uint32(key)
        rc: int = _libbpf().bpf_map_lookup_elem(self.fd, ctypes.byref(k), ctypes.byref(value))
        return rc == 0

    def close(self) -> None:
        os.close(self.fd)


class PinnedCounters:
    """Counters and drops, summed over CPUs."""

    def __init__(self, pin_dir: Path) -> None:
        self.counters = PinnedMap(pin_dir / "counters")
        self.drops = PinnedMap(pin_dir / "drops")
        self.ncpu = possible_cpus()

    def slot(self, slot: int) -> dict[Direction, tuple[int, int]]:
        out = {}
        for d in Direction:
            values = (layout.FcCounter * self.ncpu)()
            if not self.counters.lookup(layout.counter_key(slot, d), values):
                raise PinnedError(f"counters[{slot}, {d.name}] unreadable")
            out[d] = (sum(v.packets for v in values), sum(v.bytes for v in values))
        return out

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
