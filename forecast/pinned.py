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
from forecast.layout import Direction, DropReason, Family, LocalResult, SaDropReason

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
        batch_opts = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.bpf_map_update_batch.argtypes = [ctypes.c_int, *batch_opts[:3], ctypes.c_void_p]
        lib.bpf_map_lookup_batch.argtypes = [
            ctypes.c_int,
            *batch_opts,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.bpf_map_create.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.c_void_p,
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

    def update_many(self, items: dict[int, int]) -> None:
        """Write u32 values in one system call (an array map's batch update)."""
        if not items:
            return
        n = len(items)
        keys = (ctypes.c_uint32 * n)(*items.keys())
        values = (ctypes.c_uint32 * n)(*items.values())
        count = ctypes.c_uint32(n)
        rc = _libbpf().bpf_map_update_batch(self.fd, keys, values, ctypes.byref(count), None)
        if rc:
            raise PinnedError(f"{self.path.name}: batch update of {n} failed: {_errno_text()}")

    def dump(self, count: int, value_type: Any) -> list[Any]:
        """Values 0..count-1 of an array map, read in batches (one call per 4,096)."""
        out: list[Any] = []
        step = 4096
        token = ctypes.c_uint32(0)
        first = True
        while len(out) < count:
            n = min(step, count - len(out))
            keys = (ctypes.c_uint32 * n)()
            values = (value_type * n)()
            got = ctypes.c_uint32(n)
            rc = _libbpf().bpf_map_lookup_batch(
                self.fd,
                None if first else ctypes.byref(token),
                ctypes.byref(token),
                keys,
                values,
                ctypes.byref(got),
                None,
            )
            if rc and ctypes.get_errno() != errno.ENOENT:
                raise PinnedError(f"{self.path.name}: batch lookup failed: {_errno_text()}")
            out.extend(values[: got.value])
            first = False
            if rc or not got.value:
                break
        if len(out) != count:
            raise PinnedError(f"{self.path.name}: read {len(out)} of {count} entries")
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info up to verified_insns (kernel 5.16+; older kernels leave it 0)."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("_pointers", ctypes.c_uint64 * 3),  # jited/xlated insns, load_time
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("_netns", ctypes.c_uint64 * 2),
        ("_jited_ksyms", ctypes.c_uint32 * 2),
        ("_jited_ptrs", ctypes.c_uint64 * 2),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("_line_info", ctypes.c_uint64 * 2),
        ("_line_counts", ctypes.c_uint32 * 4),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
        ("_attach", ctypes.c_uint32 * 2),
    )


def prog_info(fd: int) -> _ProgInfo:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if _libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)):
        raise PinnedError(f"program info: {_errno_text()}")
    return info


class _MapCreateOpts(ctypes.Structure):
    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    )


BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12


class RcuBarrier:
    """Waits until no BPF program still runs with what it read before the call.

    The kernel waits for an RCU grace period (synchronize_rcu) whenever user space stores a map
    into a map-in-map, so every program that started before the store has finished when the
    call returns; the kernel's own selftests use the same store to the same end. Two tiny maps
    of our own, never pinned, serve only that."""

    def __init__(self) -> None:
        lib = _libbpf()
        self.inner = int(lib.bpf_map_create(BPF_MAP_TYPE_ARRAY, b"fc_rcu_inner", 4, 4, 1, None))
        if self.inner < 0:
            raise PinnedError(f"RCU barrier map: {_errno_text()}")
        opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), inner_map_fd=self.inner)
        self.outer = int(
            lib.bpf_map_create(
                BPF_MAP_TYPE_ARRAY_OF_MAPS, b"fc_rcu_outer", 4, 4, 1, ctypes.byref(opts)
            )
        )
        if self.outer < 0:
            err = _errno_text()
            os.close(self.inner)
            raise PinnedError(f"RCU barrier map-in-map: {err}")

    def wait(self) -> None:
        key, value = ctypes.c_uint32(0), ctypes.c_uint32(self.inner)
        if _libbpf().bpf_map_update_elem(
            self.outer, ctypes.byref(key), ctypes.byref(value), BPF_ANY
        ):
            raise PinnedError(f"RCU barrier: {_errno_text()}")

    def close(self) -> None:
        for fd in (self.outer, self.inner):
            if fd >= 0:
                os.close(fd)
        self.outer = self.inner = -1


class PinnedCounters:
    """Counters and drops (totals and per SA), summed over CPUs: what `status` and the metrics
    read."""

    def __init__(
        self,
        counters: PinnedMap,
        drops: PinnedMap,
        sa_drops: PinnedMap,
        families: PinnedMap | None,
        local_results: PinnedMap | None = None,
    ) -> None:
        self.counters, self.drops, self.sa_drops = counters, drops, sa_drops
        self.families = families
        self.local_results = local_results
        self.ncpu = possible_cpus()

    @classmethod
    def open(cls, maps_dir: Path) -> PinnedCounters:
        opened: list[PinnedMap] = []
        try:
            for name in ("counters", "drops", "sa_drops"):
                opened.append(PinnedMap(maps_dir / name))
        except PinnedError:
            for m in opened:
                m.close()
            raise
        # The maps of a daemon from before the per-family totals (`status` of a new package
        # while the old daemon still runs, in an upgrade) have none: no totals, not an error.
        optional = {
            name: PinnedMap(maps_dir / name) if (maps_dir / name).exists() else None
            for name in ("families", "local_results")
        }
        counters, drops, sa_drops = opened
        return cls(counters, drops, sa_drops, optional["families"], optional["local_results"])

    def slot(self, slot: int) -> dict[Direction, tuple[int, int]]:
        out = {}
        for d in Direction:
            values = (layout.FcCounter * self.ncpu)()
            if not self.counters.lookup(layout.counter_key(slot, d), values):
                raise PinnedError(f"counters[{slot}, {d.name}] unreadable")
            out[d] = (sum(v.packets for v in values), sum(v.bytes for v in values))
        return out

    def slots(self, slots: list[int]) -> dict[int, dict[Direction, tuple[int, int]]]:
        """Several slots at once: one batch read of the whole map when many are asked for
        (status and the metrics at thousands of SAs), single lookups for a few."""
        if len(slots) < 64:
            return {slot: self.slot(slot) for slot in slots}
        per_cpu = layout.FcCounter * self.ncpu
        values = self.counters.dump(layout.FC_MAX_SAS * layout.FC_DIRS, per_cpu)
        out = {}
        for slot in slots:
            by_dir = {}
            for d in Direction:
                v = values[layout.counter_key(slot, d)]
                by_dir[d] = (sum(c.packets for c in v), sum(c.bytes for c in v))
            out[slot] = by_dir
        return out

    def zero(self, slot: int) -> None:
        for d in Direction:
            self.counters.update(layout.counter_key(slot, d), (layout.FcCounter * self.ncpu)())
        for r in SaDropReason:
            self.sa_drops.update(layout.sa_drop_key(slot, r), (ctypes.c_uint64 * self.ncpu)())

    def sa_drop_counts(self, slots: list[int]) -> dict[int, dict[SaDropReason, int]]:
        """Per-SA drops by reason: a batch read of the whole map when many slots are asked."""
        per_cpu = ctypes.c_uint64 * self.ncpu
        if len(slots) < 64:
            out = {}
            for slot in slots:
                by_reason = {}
                for r in SaDropReason:
                    values = per_cpu()
                    if not self.sa_drops.lookup(layout.sa_drop_key(slot, r), values):
                        raise PinnedError(f"sa_drops[{slot}, {r.name}] unreadable")
                    by_reason[r] = int(sum(values))
                out[slot] = by_reason
            return out
        everything = self.sa_drops.dump(layout.FC_MAX_SAS * layout.FC_SA_DROPS, per_cpu)
        return {
            slot: {r: int(sum(everything[layout.sa_drop_key(slot, r)])) for r in SaDropReason}
            for slot in slots
        }

    def drop_counts(self) -> dict[DropReason, int]:
        out = {}
        for r in DropReason:
            values = (ctypes.c_uint64 * self.ncpu)()
            if not self.drops.lookup(r.value, values):
                raise PinnedError(f"drops[{r.name}] unreadable")
            out[r] = int(sum(values))
        return out

    def family_counts(self) -> dict[Family, dict[Direction, tuple[int, int]]]:
        """Copies (packets, bytes) per address family and direction, over all SAs; empty for
        maps made before there were such totals."""
        if self.families is None:
            return {}
        per_cpu = layout.FcCounter * self.ncpu
        everything = self.families.dump(layout.FC_FAMILIES * layout.FC_DIRS, per_cpu)
        out: dict[Family, dict[Direction, tuple[int, int]]] = {}
        for f in Family:
            out[f] = {}
            for d in Direction:
                v = everything[layout.family_key(f, d)]
                out[f][d] = (sum(c.packets for c in v), sum(c.bytes for c in v))
        return out

    def local_counts(self) -> dict[LocalResult, int]:
        """Local-output copies by result (the daemon's sender writes them); empty for maps
        made before the local output path."""
        if self.local_results is None:
            return {}
        values = self.local_results.dump(layout.FC_LOCAL_RESULTS, ctypes.c_uint64)
        return {r: int(values[r]) for r in LocalResult}

    def close(self) -> None:
        self.counters.close()
        self.drops.close()
        self.sa_drops.close()
        for optional in (self.families, self.local_results):
            if optional is not None:
                optional.close()
