"""Python mirror of bpf/forecast.h: constants and map value layouts (ctypes).

bpf/forecast.h is the source of truth; tests/unit/test_layout.py parses it and fails when the
two disagree.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from enum import IntEnum

FC_CHUNK = 256
FC_TAIL_CALLS = 33
FC_MAX_SAS = 8448
FC_MAX_TS = 4
FC_MAX_GROUPS = 16


class Family(IntEnum):
    IPV4 = 0
    IPV6 = 1


FC_FAMILIES = len(Family)

FC_LIST_LAN = 0
FC_LIST_REINJECT = 1
FC_LISTS = 2
FC_GENS = 2

FC_SA_ACTIVE = 0x1
FC_SA_REINJECT = 0x2
FC_SA_LOCAL_OUT = 0x4
FC_LOCAL_RING_BYTES = 4 << 20
FC_LOCAL_MAX_PACKET = 16384
FC_LOCAL_MASK = FC_LOCAL_MAX_PACKET - 1
FC_LOCAL_HEADER = 16


class Direction(IntEnum):
    LAN_TO_SA = 0
    SA_TO_LAN = 1
    SA_TO_SA = 2


FC_DIRS = len(Direction)


class DropReason(IntEnum):
    CLONE_TO_SA = 0
    CLONE_TO_LAN = 1
    UNKNOWN_ORIGIN = 2
    MALFORMED = 3
    NO_HEADROOM = 4
    CHAIN = 5
    STORM_LAN = 6
    STORM_SA = 7
    GROUP_TO_LAN = 8
    GROUP_TO_SAS = 9
    TTL = 10
    LOCAL_OUT_FULL = 11
    LOCAL_OUT_SIZE = 12


FC_DROPS = len(DropReason)


class SaDropReason(IntEnum):
    STORM = 0
    GROUP_TO_LAN = 1
    GROUP_TO_SAS = 2
    CLONE = 3
    LOCAL_OUT = 4


FC_SA_DROPS = len(SaDropReason)


class LocalResult(IntEnum):
    """What became of a local-output copy (the daemon's sender counts, status reads)."""

    SENT = 0
    NOT_LIVE = 1
    REFUSED = 2
    TOO_LARGE = 3
    UNREACHABLE = 4
    NO_BUFFER = 5
    OTHER = 6
    UNSUPPORTED = 7


FC_LOCAL_RESULTS = len(LocalResult)
FC_BUCKET_LAN = FC_MAX_SAS
FC_BUCKETS = FC_MAX_SAS + 1


class FcTs(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint32), ("mask", ctypes.c_uint32))


class FcIn6(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint32 * 4),)


class FcTs6(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint32 * 4), ("mask", ctypes.c_uint32 * 4))


class FcSa(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("mark_out", ctypes.c_uint32),
        ("mark_in", ctypes.c_uint32),
        ("n_ts", ctypes.c_uint32),
        ("ts", FcTs * FC_MAX_TS),
        ("n_ts6", ctypes.c_uint32),
        ("ts6", FcTs6 * FC_MAX_TS),
    )


class FcRate(ctypes.Structure):
    _fields_ = (("interval_ns", ctypes.c_uint64), ("burst_ns", ctypes.c_uint64))


class FcBucket(ctypes.Structure):
    _fields_ = (("tat", ctypes.c_uint64),)


class FcConfig(ctypes.Structure):
    _fields_ = (
        ("xfrm_ifindex", ctypes.c_uint32),
        ("lan_ifindex", ctypes.c_uint32),
        ("lan_broadcast", ctypes.c_uint32),
        ("n_groups", ctypes.c_uint32),
        ("groups", ctypes.c_uint32 * FC_MAX_GROUPS),
        ("group_dirs", ctypes.c_uint32 * FC_MAX_GROUPS),
        ("any_group_dirs", ctypes.c_uint32),
        ("lan_mac", ctypes.c_uint8 * 6),
        ("pad", ctypes.c_uint8 * 6),
        ("lan_rate", FcRate),
        ("sa_rate", FcRate),
        ("n_groups6", ctypes.c_uint32),
        ("group6_dirs", ctypes.c_uint32 * FC_MAX_GROUPS),
        ("groups6", FcIn6 * FC_MAX_GROUPS),
        ("n_local_out", ctypes.c_uint32),
    )


class FcLocalCopy(ctypes.Structure):
    """One local-output record: FC_LOCAL_HEADER bytes, then `len` bytes of packet."""

    _fields_ = (
        ("mark", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("len", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
        ("packet", ctypes.c_uint8 * FC_LOCAL_MAX_PACKET),
    )


# FcLocalCopy's header fields (mark, slot, len, family) for the sender's per-copy loop, where a
# struct unpack is cheaper than a ctypes view.
LOCAL_COPY_HEADER = struct.Struct("=IIHB")


class FcCounter(ctypes.Structure):
    _fields_ = (("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64))


# What the numbers are called wherever a person or a program reads them: status (JSON keys),
# metrics (label values), logs.
DIRECTION_NAMES = {d: d.name.lower() for d in Direction}  # lan_to_sa, sa_to_lan, sa_to_sa
DIRECTION_TITLES = {
    Direction.LAN_TO_SA: "LAN>SA",
    Direction.SA_TO_LAN: "SA>LAN",
    Direction.SA_TO_SA: "SA>SA",
}
FAMILY_NAMES = {f: f.name.lower() for f in Family}  # ipv4, ipv6


def be32(address: str) -> int:
    """An IPv4 address as the u32 the kernel stores (network byte order in memory)."""
    return int(struct.unpack("=I", socket.inet_aton(address))[0])


def be128(address: str) -> tuple[int, int, int, int]:
    """An IPv6 address as the four u32 the kernel stores (network byte order in memory)."""
    a, b, c, d = struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, address))
    return a, b, c, d


def family_key(family: Family, direction: Direction) -> int:
    return int(family) * FC_DIRS + int(direction)


def counter_key(slot: int, direction: Direction) -> int:
    return slot * FC_DIRS + int(direction)


def sa_drop_key(slot: int, reason: SaDropReason) -> int:
    return slot * FC_SA_DROPS + int(reason)


def target_key(gen: int, lst: int, i: int) -> int:
    return (gen * FC_LISTS + lst) * FC_MAX_SAS + i


def list_key(gen: int, lst: int) -> int:
    return gen * FC_LISTS + lst
