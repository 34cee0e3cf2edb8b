"""BPF_PROG_TEST_RUN on the real programs, and crafted frames to feed them.

The kernel runs a TC program once on a buffer we give it, as if it had arrived on `ifindex`
with `mark`: every branch of the classifier is reachable without a network, and 10,000
buffers take a second. Helpers and copies work as on a real packet (a copy really leaves the
device it is redirected to), so the test's own witnesses still count them."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from dataclasses import dataclass

from forecast.pinned import _libbpf
from forecast_lab import netns

SKB_CTX_SIZE = 68  # struct __sk_buff up to the end of cb[]: all a TC test run may set
SKB_MARK, SKB_IFINDEX = 8, 40  # offsets in struct __sk_buff
TC_ACT_OK = 0


class _TestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (libbpf 1.x)."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    )


@dataclass
class RunResult:
    retval: int
    data_out: bytes


def run(prog_fd: int, frame: bytes, *, ifindex: int, mark: int = 0) -> RunResult:
    """Run the program once on `frame` (from its Ethernet header) in this thread's netns."""
    lib = _libbpf()
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
    data_in = ctypes.create_string_buffer(frame, len(frame))
    out_size = len(frame) + 256  # room for a pushed header
    data_out = ctypes.create_string_buffer(out_size)
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("=I", ctx, SKB_MARK, mark)
    struct.pack_into("=I", ctx, SKB_IFINDEX, ifindex)
    ctx_in = (ctypes.c_char * SKB_CTX_SIZE).from_buffer(ctx)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(frame),
        data_size_out=out_size,
        ctx_in=ctypes.cast(ctx_in, ctypes.c_void_p),
        ctx_size_in=SKB_CTX_SIZE,
        repeat=1,
    )
    rc = lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)} (frame of {len(frame)} B)")
    return RunResult(int(opts.retval), data_out.raw[: opts.data_size_out])


def run_many(
    ns: str, prog_fd: int, frames: list[bytes], *, ifindex: int, mark: int = 0
) -> list[RunResult]:
    """`run` for each frame, with this thread inside namespace `ns` (where `ifindex` lives)."""
    with netns.entered(ns):
        return [run(prog_fd, f, ifindex=ifindex, mark=mark) for f in frames]


def send_frames(ns: str, device: str, frames: list[bytes], *, mark: int = 0) -> None:
    """Put each frame on the wire of `device` in namespace `ns` as it is (AF_PACKET): it
    arrives at the veth peer as any frame from that host would."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sock.bind((device, 0))
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        for frame in frames:
            sock.send(frame)
    finally:
        sock.close()


# -- crafted frames ------------------------------------------------------------------------
ETH_IP, ETH_IPV6, ETH_ARP, ETH_VLAN = 0x0800, 0x86DD, 0x0806, 0x8100
BROADCAST_MAC = b"\xff" * 6


def multicast_mac(group: str) -> bytes:
    a = bytes(int(x) for x in group.split("."))
    return bytes([0x01, 0x00, 0x5E, a[1] & 0x7F, a[2], a[3]])


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip4(
    src: str,
    dst: str,
    payload: bytes,
    *,
    proto: int = 17,
    ttl: int = 4,
    options: bytes = b"",
    frag_off: int = 0,
    tot_len: int | None = None,
    ihl: int | None = None,
    version: int = 4,
) -> bytes:
    """An IPv4 packet; every field can be made wrong on purpose."""
    assert len(options) % 4 == 0
    hl = ihl if ihl is not None else 5 + len(options) // 4
    length = tot_len if tot_len is not None else 20 + len(options) + len(payload)
    header = (
        struct.pack(
            "!BBHHHBBH4s4s",
            (version << 4) | hl,
            0,
            length & 0xFFFF,
            0x1234,
            frag_off,
            ttl,
            proto,
            0,
            bytes(int(x) for x in src.split(".")),
            bytes(int(x) for x in dst.split(".")),
        )
        + options
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def multicast_mac6(group: str) -> bytes:
    """33:33 and the group's last 32 bits (RFC 2464)."""
    return b"\x33\x33" + socket.inet_pton(socket.AF_INET6, group)[12:]


def ip6(
    src: str,
    dst: str,
    payload: bytes,
    *,
    nexthdr: int = 17,
    hop_limit: int = 1,
    payload_len: int | None = None,
    version: int = 6,
) -> bytes:
    """An IPv6 packet (fixed header only); every field can be made wrong on purpose."""
    length = payload_len if payload_len is not None else len(payload)
    header = struct.pack(
        "!IHBB16s16s",
        version << 28,
        length & 0xFFFF,
        nexthdr,
        hop_limit,
        socket.inet_pton(socket.AF_INET6, src),
        socket.inet_pton(socket.AF_INET6, dst),
    )
    return header + payload


def udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload
