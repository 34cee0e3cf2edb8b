"""The loaded data path: both TC programs, their pinned maps, and typed access to them.

Control plane code writes `DatapathConfig` and `SaEntry` values; it never touches bcc or
ctypes. Everything here mirrors bpf/forecast.h through forecast.layout.

What lives under `pin_dir` (a bpffs directory), and why it outlives the daemon:
  maps-<L>/{config,sas,marks,counters,drops,     L: digest of the map layout (forecast.h, maps.h)
            sa_drops,families,buckets,targets,list_len,gen,
            local_out,local_scratch}                local_out: copies queued for the daemon
  prog-<P>-lan, prog-<P>-tunnel                   P: digest of every BPF source, the kernel, bcc
  chain-<P>-lan, chain-<P>-tunnel                 each program's walkers (IPv4, IPv6): tail calls
The tc filters hold the programs and the programs the maps, so forwarding goes on while no
daemon runs (a restart, an upgrade, a crash). A restarted daemon whose P is already pinned
adopts the programs without compiling; a new P (an upgrade) is compiled beside the running one
and swapped in atomically; a new L gets fresh maps, filled before the swap.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import platform
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from forecast import bpf_build, layout
from forecast.config import RateLimit
from forecast.layout import Direction, DropReason, Family, SaDropReason
from forecast.pinned import PinnedCounters, PinnedMap, obj_get, obj_pin, prog_info
from forecast.targets import TargetLists

# role → (source, entry program the tc filter runs, the walkers it tail-calls, by family)
PROGRAMS = {
    "lan": ("lan_ingress.bpf.c", "fc_lan_ingress", ("fc_lan_walk", "fc_lan_walk6")),
    "tunnel": ("tunnel_ingress.bpf.c", "fc_tunnel_ingress", ("fc_tunnel_walk", "fc_tunnel_walk6")),
}
# where a filter sits (the daemon's hooks) → the program it runs: the tunnel program also on the
# WAN device, for mark-only SAs' decrypted traffic (it arrives there, not on the XFRM interface)
HOOK_PROGRAMS = {"lan": "lan", "tunnel": "tunnel", "wan": "tunnel"}
MAP_NAMES = (
    "config",
    "sas",
    "marks",
    "counters",
    "drops",
    "sa_drops",
    "families",
    "buckets",
    "targets",
    "list_len",
    "gen",
    "local_out",
)
NO_LIMIT = RateLimit(0, 0)
# The map definitions: a change here needs new maps; any other source change only new programs.
LAYOUT_SOURCES = ("forecast.h", "lib/maps.h")


class DatapathError(RuntimeError):
    """A value does not fit the data path's maps; the message names it."""


Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class DatapathConfig:
    xfrm_ifindex: int
    lan_ifindex: int
    lan_mac: bytes
    lan_broadcast: IPv4Address | None
    groups: tuple[Address, ...]  # LAN → clients, either family
    # What clients' packets may go to, per direction; None: any multicast group
    client_groups_to_lan: tuple[Address, ...] | None = None
    client_groups_to_sas: tuple[Address, ...] | None = None
    lan_rate: RateLimit = NO_LIMIT
    sa_rate: RateLimit = NO_LIMIT
    # SAs served by the local output path: none spares every packet a copy into the queue's
    # scratch buffer
    local_out_sas: int = 0


@dataclass(frozen=True)
class SaEntry:
    mark_out: int
    mark_in: int
    selectors: tuple[Network, ...]  # either family, at most FC_MAX_TS of each
    reinject: bool = False
    # False: in the table (its decrypted traffic is forwarded and counted) but on no target
    # list, because a newer SA to the same peer takes the copies (desired.py). Not in the map.
    copies: bool = True
    # A mark-only SA (no if_id): copies are queued to the daemon, which sends them through the
    # local output path with mark_out (forecast/local_out.py).
    local_out: bool = False


@dataclass
class Traffic:
    packets: int = 0
    bytes: int = 0


@dataclass
class SlotCounters:
    by_direction: dict[Direction, Traffic] = field(
        default_factory=lambda: {d: Traffic() for d in Direction}
    )


def group_directions(cfg: DatapathConfig) -> tuple[dict[Address, int], int]:
    """Each named group → the directions (bits 1 << Direction) that forward it, and the
    directions that forward any group."""
    per_direction = (
        (Direction.LAN_TO_SA, cfg.groups),
        (Direction.SA_TO_LAN, cfg.client_groups_to_lan),
        (Direction.SA_TO_SA, cfg.client_groups_to_sas),
    )
    dirs: dict[Address, int] = {}
    any_dirs = 0
    for direction, groups in per_direction:
        if groups is None:
            any_dirs |= 1 << direction
            continue
        for group in groups:
            if not group.is_multicast:
                raise DatapathError(f"group {group} is not a multicast address")
            dirs[group] = dirs.get(group, 0) | 1 << direction
    return dirs, any_dirs


def encode_rate(limit: RateLimit) -> layout.FcRate:
    out = layout.FcRate()
    if limit.rate:
        if limit.burst < 1:
            raise DatapathError(f"a rate of {limit.rate}/s needs a burst of at least 1")
        out.interval_ns = max(1, 1_000_000_000 // limit.rate)
        out.burst_ns = out.interval_ns * limit.burst
    return out


def encode_config(cfg: DatapathConfig) -> layout.FcConfig:
    dirs, any_dirs = group_directions(cfg)
    dirs4 = {g: bits for g, bits in dirs.items() if g.version == 4}
    dirs6 = {g: bits for g, bits in dirs.items() if g.version == 6}
    for family, per_family in (("IPv4", dirs4), ("IPv6", dirs6)):
        if len(per_family) > layout.FC_MAX_GROUPS:
            raise DatapathError(
                f"{len(per_family)} {family} groups; the data path holds at most "
                f"{layout.FC_MAX_GROUPS} per family"
            )
    if len(cfg.lan_mac) != 6:
        raise DatapathError(f"LAN MAC must be 6 bytes, got {cfg.lan_mac!r}")
    out = layout.FcConfig()
    out.xfrm_ifindex = cfg.xfrm_ifindex
    out.lan_ifindex = cfg.lan_ifindex
    out.lan_broadcast = layout.be32(str(cfg.lan_broadcast)) if cfg.lan_broadcast else 0
    out.n_groups = len(dirs4)
    for i, (group, bits) in enumerate(dirs4.items()):
        out.groups[i] = layout.be32(str(group))
        out.group_dirs[i] = bits
    out.n_groups6 = len(dirs6)
    for i, (group6, bits) in enumerate(dirs6.items()):
        out.groups6[i].addr[:] = layout.be128(str(group6))
        out.group6_dirs[i] = bits
    out.any_group_dirs = any_dirs
    out.lan_mac[:] = list(cfg.lan_mac)
    out.lan_rate = encode_rate(cfg.lan_rate)
    out.sa_rate = encode_rate(cfg.sa_rate)
    out.n_local_out = cfg.local_out_sas
    return out


def encode_sa(sa: SaEntry) -> layout.FcSa:
    ts4 = [net for net in sa.selectors if net.version == 4]
    ts6 = [net for net in sa.selectors if net.version == 6]
    for family, nets in (("IPv4", ts4), ("IPv6", ts6)):
        if len(nets) > layout.FC_MAX_TS:
            raise DatapathError(
                f"{len(nets)} {family} selectors; the data path holds at most "
                f"{layout.FC_MAX_TS} per family and SA"
            )
    if not sa.mark_out or not sa.mark_in:
        raise DatapathError("an SA in the data path needs non-zero in and out marks")
    out = layout.FcSa()
    out.flags = (
        layout.FC_SA_ACTIVE
        | (layout.FC_SA_REINJECT if sa.reinject else 0)
        | (layout.FC_SA_LOCAL_OUT if sa.local_out else 0)
    )
    out.mark_out, out.mark_in = sa.mark_out, sa.mark_in
    out.n_ts, out.n_ts6 = len(ts4), len(ts6)
    for i, net in enumerate(ts4):
        out.ts[i].addr = layout.be32(str(net.network_address))
        out.ts[i].mask = layout.be32(str(net.netmask))
    for i, net6 in enumerate(ts6):
        out.ts6[i].addr[:] = layout.be128(str(net6.network_address))
        out.ts6[i].mask[:] = layout.be128(str(net6.netmask))
    return out


def decode_sa(value: layout.FcSa) -> SaEntry | None:
    """A slot as the kernel holds it; None for an empty one."""
    if not value.flags & layout.FC_SA_ACTIVE:
        return None
    selectors: list[Network] = []
    for ts in value.ts[: min(int(value.n_ts), layout.FC_MAX_TS)]:
        addr = IPv4Address(struct.pack("=I", ts.addr))  # stored in network byte order
        mask = IPv4Address(struct.pack("=I", ts.mask))
        selectors.append(IPv4Network(f"{addr}/{mask}", strict=False))
    for ts6 in value.ts6[: min(int(value.n_ts6), layout.FC_MAX_TS)]:
        addr6 = IPv6Address(struct.pack("=4I", *ts6.addr))
        prefix = int.from_bytes(struct.pack("=4I", *ts6.mask), "big").bit_count()
        selectors.append(IPv6Network(f"{addr6}/{prefix}", strict=False))
    return SaEntry(
        int(value.mark_out),
        int(value.mark_in),
        tuple(selectors),
        bool(value.flags & layout.FC_SA_REINJECT),
        local_out=bool(value.flags & layout.FC_SA_LOCAL_OUT),
    )


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:12]


def layout_digest(bpf_dir: Path | None = None) -> str:
    src = bpf_dir or bpf_build.bpf_dir()
    return _digest((src / name).read_bytes() for name in LAYOUT_SOURCES)


def program_digest(bpf_dir: Path | None = None) -> str:
    """Everything that makes a compiled program what it is."""
    src = bpf_dir or bpf_build.bpf_dir()
    files = sorted(p for p in src.rglob("*") if p.suffix in (".c", ".h"))
    return _digest(
        [
            *(str(p.relative_to(src)).encode() + p.read_bytes() for p in files),
            platform.release().encode(),
            bpf_build.bcc_version().encode(),
        ]
    )


def filter_name(function: str, digest: str) -> str:
    """What a tc filter of ours is called: which program, and which build of it."""
    return f"{function}-{digest}"


class Datapath:
    """Both programs loaded and pinned under `pin_dir`, with typed access to their maps."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self.layout = layout_digest()
        self.digest = program_digest()
        self.maps_dir = pin_dir / f"maps-{self.layout}"
        self.fds: dict[str, int] = {}
        self.maps: dict[str, PinnedMap] = {}
        self.compiled = False  # False: adopted from pins, no compile needed
        self.fresh_maps = False  # True: this layout's maps did not exist before this start
        self._counters: PinnedCounters | None = None
        self.targets: TargetLists | None = None
        self.verified: dict[str, int] = {}  # program → verifier instructions (when compiled)

    def _prog_pin(self, role: str) -> Path:
        return self.pin_dir / f"prog-{self.digest}-{role}"

    def _chain_pin(self, role: str) -> Path:
        return self.pin_dir / f"chain-{self.digest}-{role}"

    def _pins(self) -> list[Path]:
        return [pin(role) for role in PROGRAMS for pin in (self._prog_pin, self._chain_pin)]

    def filter_name(self, hook: str) -> str:
        return filter_name(PROGRAMS[HOOK_PROGRAMS[hook]][1], self.digest)

    def fd_for(self, hook: str) -> int:
        return self.fds[HOOK_PROGRAMS[hook]]

    def load(self) -> None:
        """Adopt this build's pinned programs, or compile and pin them; open the maps."""
        # Only root reaches the maps (the SA table, the counters) and programs: the pins are
        # 0600 by the kernel, the directory ours to close, whatever the umask.
        self.pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.pin_dir.chmod(0o700)
        self.fresh_maps = not self.maps_dir.exists()
        if self.fresh_maps or not all(pin.exists() for pin in self._pins()):
            self.verified = _compile_in_child(self.pin_dir)
            self.compiled = True
        for role in PROGRAMS:
            self.fds[role] = obj_get(self._prog_pin(role))
        for name in MAP_NAMES:
            self.maps[name] = PinnedMap(self.maps_dir / name)
        # The same descriptors: counters and drops are two of the maps just opened.
        self._counters = PinnedCounters(
            self.maps["counters"], self.maps["drops"], self.maps["sa_drops"], self.maps["families"]
        )
        self.targets = TargetLists(self.maps["targets"], self.maps["list_len"], self.maps["gen"])
        self.targets.read()

    def compile_and_pin(self) -> dict[str, int]:
        """Compile both programs and their walkers here, pin them with their maps; returns
        verifier instructions per program."""
        verified: dict[str, int] = {}
        self.maps_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for role, (source, entry, walkers) in PROGRAMS.items():
            for pin in (self._prog_pin(role), self._chain_pin(role)):
                pin.unlink(missing_ok=True)  # a half-made build: start it again
            bpf, fds = bpf_build.compile_programs(
                source, (entry, *walkers), self.maps_dir, self._chain_pin(role)
            )
            try:
                chain = PinnedMap(self._chain_pin(role))
                try:
                    for family, walker in zip(Family, walkers, strict=True):
                        chain.update(int(family), ctypes.c_uint32(fds[walker]))
                finally:
                    chain.close()
                obj_pin(fds[entry], self._prog_pin(role))
                verified |= {name: prog_info(fd).verified_insns for name, fd in fds.items()}
            finally:
                bpf.cleanup()  # the pins (and later the tc filter) keep the programs
        return verified

    def prune(self) -> list[Path]:
        """Unpin the programs and maps of other builds (unused once our filters are in place);
        returns what went."""
        keep = {self.maps_dir, *self._pins()}
        stale = sorted(p for p in self.pin_dir.iterdir() if p not in keep)
        for path in stale:
            _unpin(path)
        return stale

    # -- writes -----------------------------------------------------------------------------
    def write_config(self, cfg: DatapathConfig) -> None:
        self.maps["config"].update(0, encode_config(cfg))

    def write_sa(self, slot: int, sa: SaEntry | None) -> None:
        """Fill or clear one slot. A slot that gets a different SA (another inbound mark)
        starts from zero counters; the same SA updated (a rekey narrowing its selectors) keeps
        counting."""
        if not 0 <= slot < layout.FC_MAX_SAS:
            raise DatapathError(f"slot {slot} outside 0..{layout.FC_MAX_SAS - 1}")
        sas, marks = self.maps["sas"], self.maps["marks"]
        old = self.read_slot(slot)
        old_mark = old.mark_in if old else 0
        if sa is None:
            sas.update(slot, layout.FcSa())
            if old_mark:
                marks.delete(old_mark)
            return
        value = encode_sa(sa)
        if old_mark != sa.mark_in:
            if old_mark:
                marks.delete(old_mark)
            assert self._counters is not None
            self._counters.zero(slot)
            # A new SA starts with a full bucket, whatever the last one in this slot sent.
            self.maps["buckets"].update(slot, layout.FcBucket())
        sas.update(slot, value)
        marks.update(sa.mark_in, ctypes.c_uint32(slot))

    def publish_targets(self, entries: dict[int, SaEntry]) -> bool:
        """The walkers' lists from the filled slots that take copies: all of them for the LAN,
        the reinjecting ones for client-to-client copies. Atomic for packets (forecast.targets)."""
        assert self.targets is not None
        return self.targets.publish(
            {
                layout.FC_LIST_LAN: [s for s, e in entries.items() if e.copies],
                layout.FC_LIST_REINJECT: [s for s, e in entries.items() if e.copies and e.reinject],
            }
        )

    def sync_targets(self) -> bool:
        """The lists from what the slots hold now (tests and tools that write slots directly)."""
        return self.publish_targets(self.read_slots())

    # -- reads ------------------------------------------------------------------------------
    def read_slot(self, slot: int) -> SaEntry | None:
        value = layout.FcSa()
        if not self.maps["sas"].lookup(slot, value):
            raise DatapathError(f"sas[{slot}] unreadable")
        return decode_sa(value)

    def read_slots(self) -> dict[int, SaEntry]:
        """Every filled slot as the kernel holds it: what a restarted daemon starts from."""
        out = {}
        for slot, value in enumerate(self.maps["sas"].dump(layout.FC_MAX_SAS, layout.FcSa)):
            entry = decode_sa(value)
            if entry is not None:
                out[slot] = entry
        return out

    def counters(self, slots: Iterable[int] | None = None) -> dict[int, SlotCounters]:
        assert self._counters is not None
        wanted = list(slots) if slots is not None else list(range(layout.FC_MAX_SAS))
        out: dict[int, SlotCounters] = {}
        for slot, by_dir in self._counters.slots(wanted).items():
            sc = SlotCounters()
            for d, (packets, nbytes) in by_dir.items():
                sc.by_direction[d] = Traffic(packets, nbytes)
            out[slot] = sc
        return out

    def family_counters(self) -> dict[Family, dict[Direction, Traffic]]:
        """Copies per address family and direction, over all SAs."""
        assert self._counters is not None
        return {
            f: {d: Traffic(*pb) for d, pb in by_dir.items()}
            for f, by_dir in self._counters.family_counts().items()
        }

    def drops(self) -> dict[DropReason, int]:
        assert self._counters is not None
        return self._counters.drop_counts()

    def sa_drops(self, slots: Iterable[int]) -> dict[int, dict[SaDropReason, int]]:
        assert self._counters is not None
        return self._counters.sa_drop_counts(list(slots))

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Let go of every descriptor; the pins (and what the filters hold) stay."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        self._counters = None  # its maps were among those just closed
        if self.targets is not None:
            self.targets.close()
            self.targets = None

    def remove(self) -> None:
        """A deliberate stop: close, then unpin every program and map of every build."""
        self.close()
        remove_pins(self.pin_dir)


def _compile_in_child(pin_dir: Path) -> dict[str, int]:
    """Compile and pin in a child process: bcc maps LLVM (about 130 MB) into whoever compiles,
    and the daemon should not carry that for the rest of its life. The child pins; the caller
    adopts the pins. A fresh interpreter (spawn), so no thread or lock of ours is copied."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_compile_child, args=(str(pin_dir), send), name="fc-compile")
    proc.start()
    send.close()
    try:
        result: object = receive.recv()
    except EOFError:  # the child died before it could answer
        result = None
    finally:
        receive.close()
        proc.join()
    if isinstance(result, dict):
        return result
    raise bpf_build.BuildError(
        str(result) if result is not None else f"the compiler process exited {proc.exitcode}"
    )


def _compile_child(pin_dir: str, send: Any) -> None:
    try:
        send.send(Datapath(Path(pin_dir)).compile_and_pin())
    except Exception as exc:  # the message crosses back; the parent raises BuildError with it
        send.send(str(exc))
    finally:
        send.close()


def _unpin(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)  # bpffs: unlink each pin, then the directory
    else:
        path.unlink(missing_ok=True)


def remove_pins(pin_dir: Path) -> None:
    if pin_dir.exists():
        for path in pin_dir.iterdir():
            _unpin(path)
        pin_dir.rmdir()
