"""The loaded data path: both TC programs, their pinned maps, and typed access to them.

Control plane code writes `DatapathConfig` and `SaEntry` values; it never touches bcc or
ctypes. Everything here mirrors bpf/forecast.h through forecast.layout.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from forecast import bpf_build, layout
from forecast.layout import Direction, DropReason

PROGRAMS = {
    "lan": ("lan_ingress.bpf.c", "fc_lan_ingress"),
    "tunnel": ("tunnel_ingress.bpf.c", "fc_tunnel_ingress"),
}
MAP_NAMES = ("config", "sas", "marks", "counters", "drops")


class DatapathError(RuntimeError):
    """A value does not fit the data path's maps; the message names it."""


@dataclass(frozen=True)
class DatapathConfig:
    xfrm_ifindex: int
    lan_ifindex: int
    lan_mac: bytes
    lan_broadcast: IPv4Address | None
    groups: tuple[IPv4Address, ...]


@dataclass(frozen=True)
class SaEntry:
    mark_out: int
    mark_in: int
    selectors: tuple[IPv4Network, ...]
    reinject: bool = False


@dataclass
class Traffic:
    packets: int = 0
    bytes: int = 0


@dataclass
class SlotCounters:
    by_direction: dict[Direction, Traffic] = field(
        default_factory=lambda: {d: Traffic() for d in Direction}
    )


def encode_config(cfg: DatapathConfig) -> layout.FcConfig:
    if len(cfg.groups) > layout.FC_MAX_GROUPS:
        raise DatapathError(
            f"{len(cfg.groups)} groups; the data path holds at most {layout.FC_MAX_GROUPS}"
        )
    if len(cfg.lan_mac) != 6:
        raise DatapathError(f"LAN MAC must be 6 bytes, got {cfg.lan_mac!r}")
    out = layout.FcConfig()
    out.xfrm_ifindex = cfg.xfrm_ifindex
    out.lan_ifindex = cfg.lan_ifindex
    out.lan_broadcast = layout.be32(str(cfg.lan_broadcast)) if cfg.lan_broadcast else 0
    out.n_groups = len(cfg.groups)
    for i, group in enumerate(cfg.groups):
        if not group.is_multicast:
            raise DatapathError(f"group {group} is not an IPv4 multicast address")
        out.groups[i] = layout.be32(str(group))
    out.lan_mac[:] = list(cfg.lan_mac)
    return out


def encode_sa(sa: SaEntry) -> layout.FcSa:
    if len(sa.selectors) > layout.FC_MAX_TS:
        raise DatapathError(
            f"{len(sa.selectors)} selectors; the data path holds at most {layout.FC_MAX_TS} per SA"
        )
    if not sa.mark_out or not sa.mark_in:
        raise DatapathError("an SA in the data path needs non-zero in and out marks")
    out = layout.FcSa()
    out.flags = layout.FC_SA_ACTIVE | (layout.FC_SA_REINJECT if sa.reinject else 0)
    out.mark_out, out.mark_in, out.n_ts = sa.mark_out, sa.mark_in, len(sa.selectors)
    for i, net in enumerate(sa.selectors):
        out.ts[i].addr = layout.be32(str(net.network_address))
        out.ts[i].mask = layout.be32(str(net.netmask))
    return out


def _leaf(table: Any, value: ctypes.Structure) -> Any:
    # bcc builds its own ctypes types from the C source: equal sizes prove the mirror holds.
    if ctypes.sizeof(table.Leaf) != ctypes.sizeof(value):
        raise DatapathError(
            f"{type(value).__name__} is {ctypes.sizeof(value)} bytes, the map "
            f"holds {ctypes.sizeof(table.Leaf)}: forecast/layout.py is stale"
        )
    return table.Leaf.from_buffer_copy(bytes(value))


class Datapath:
    """Both programs compiled and loaded, maps pinned under `pin_dir`."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._bpf: dict[str, Any] = {}
        self.fds: dict[str, int] = {}

    def load(self) -> None:
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        for role, (source, function) in PROGRAMS.items():
            self._bpf[role], self.fds[role] = bpf_build.compile_program(
                source, function, self.pin_dir
            )

    def _table(self, name: str) -> Any:
        return self._bpf["lan"].get_table(f"fc_{name}".encode())

    # -- writes -----------------------------------------------------------------------------
    def write_config(self, cfg: DatapathConfig) -> None:
        table = self._table("config")
        table[ctypes.c_uint32(0)] = _leaf(table, encode_config(cfg))

    def write_sa(self, slot: int, sa: SaEntry | None) -> None:
        """Fill or clear one slot. A slot that gets a different SA (another inbound mark)
        starts from zero counters; the same SA updated (a rekey narrowing its selectors) keeps
        counting."""
        if not 0 <= slot < layout.FC_MAX_SAS:
            raise DatapathError(f"slot {slot} outside 0..{layout.FC_MAX_SAS - 1}")
        table, marks = self._table("sas"), self._table("marks")
        old = table[ctypes.c_uint32(slot)]
        old_mark = old.mark_in if old.flags & layout.FC_SA_ACTIVE else 0
        if sa is None:
            table[ctypes.c_uint32(slot)] = table.Leaf()
            if old_mark:
                marks.pop(ctypes.c_uint32(old_mark), None)
            return
        value = _leaf(table, encode_sa(sa))
        if old_mark != sa.mark_in:
            if old_mark:
                marks.pop(ctypes.c_uint32(old_mark), None)
            self._zero_counters(slot)
        table[ctypes.c_uint32(slot)] = value
        marks[ctypes.c_uint32(sa.mark_in)] = ctypes.c_uint32(slot)

    def active_slots(self) -> dict[int, int]:
        """mark_in → slot of every filled slot: what a restarted daemon adopts."""
        table = self._table("sas")
        out = {}
        for slot in range(layout.FC_MAX_SAS):
            value = table[ctypes.c_uint32(slot)]
            if value.flags & layout.FC_SA_ACTIVE:
                out[int(value.mark_in)] = slot
        return out

    def _zero_counters(self, slot: int) -> None:
        counters = self._table("counters")
        for d in Direction:
            # A per-CPU table's Leaf is already the array over every possible CPU.
            counters[ctypes.c_uint32(layout.counter_key(slot, d))] = counters.Leaf()

    # -- reads ------------------------------------------------------------------------------
    def counters(self, slots: Iterable[int] | None = None) -> dict[int, SlotCounters]:
        table = self._table("counters")
        out: dict[int, SlotCounters] = {}
        for slot in slots if slots is not None else range(layout.FC_MAX_SAS):
            sc = SlotCounters()
            for d in Direction:
                per_cpu = table[ctypes.c_uint32(layout.counter_key(slot, d))]
                sc.by_direction[d] = Traffic(
                    sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)
                )
            out[slot] = sc
        return out

    def drops(self) -> dict[DropReason, int]:
        table = self._table("drops")
        return {r: int(sum(table[ctypes.c_uint32(r.value)])) for r in DropReason}

    # -- teardown ---------------------------------------------------------------------------
    def close(self, *, unpin: bool) -> None:
        for bpf in self._bpf.values():
            bpf.cleanup()
        self._bpf.clear()
        self.fds.clear()
        if unpin:
            for name in MAP_NAMES:
                path = self.pin_dir / name
                if path.exists():
                    os.unlink(path)
            shutil.rmtree(self.pin_dir, ignore_errors=True)
