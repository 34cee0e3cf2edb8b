"""Send multicast/broadcast from any lab host and count, per packet, what each host received.

Every datagram carries "<tag> <seq>", so a receiver can tell exactly-once from duplicates, echoes
and losses. Receivers and senders run as `python -m forecast_lab.traffic` inside the host's
namespace; the functions below drive them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_RECEIVE_SECONDS = 900.0  # the longest lab scenario (systemd lifecycle) runs ~5 min
MAX_SEND_COUNT = 100_000
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
PKTGEN_MAGIC = bytes.fromhex("be9be955")


@dataclass
class Received:
    """What one receiver saw: payload → times received, and payload → source address."""

    counts: Counter[str] = field(default_factory=Counter)
    sources: dict[str, str] = field(default_factory=dict)

    def for_tag(self, tag: str) -> Counter[int]:
        out: Counter[int] = Counter()
        for payload, n in self.counts.items():
            # "<tag> <seq>[ <padding>]"
            t, seq, *_ = [*payload.split(" ", 2), ""]
            if t == tag:
                out[int(seq)] += n
        return out

    def exactly_once(self, tag: str, count: int) -> bool:
        return self.for_tag(tag) == Counter(dict.fromkeys(range(count), 1))

    def total(self, tag: str) -> int:
        return sum(self.for_tag(tag).values())


# -- the in-namespace programs -----------------------------------------------------------------
def _ifindex(name: str) -> int:
    return socket.if_nametoindex(name)


def _is6(address: str) -> bool:
    return ":" in address


def receive_main(args: argparse.Namespace) -> int:
    # One family per receiver: IPv6 when its groups are (a v6 socket would also take IPv4).
    v6 = any(_is6(g) for g in args.group) or args.ipv6
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Room for seconds of traffic: under emulation this reader can fall behind a 1,000/s
    # sender, and a copy lost in its queue would be blamed on the forwarder.
    with contextlib.suppress(PermissionError):
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("::" if v6 else "", args.port))
    for group in args.group:
        # Join on the named interface (on a client that is the WAN device the decrypted
        # packets arrive on).
        if v6:
            mreq = struct.pack(
                "16si", socket.inet_pton(socket.AF_INET6, group), _ifindex(args.iface)
            )
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
            continue
        mreq = struct.pack(
            "4s4si", socket.inet_aton(group), socket.inet_aton("0.0.0.0"), _ifindex(args.iface)
        )
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    stop = False

    def on_signal(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    counts: Counter[str] = Counter()
    sources: dict[str, str] = {}
    print("READY", flush=True)
    deadline = time.monotonic() + min(args.seconds, MAX_RECEIVE_SECONDS)
    while not stop and time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.05)
        if not ready:
            continue
        data, addr = sock.recvfrom(65535)
        src, sport = addr[0].split("%")[0], addr[1]  # an IPv6 link-local source has a scope
        if args.pktgen:
            # pktgen's own header: magic, then its sequence number; the source port tags the run
            if data[:4] != PKTGEN_MAGIC:
                continue
            payload = f"p{sport} {struct.unpack_from('!I', data, 4)[0]}"
        else:
            payload = data.decode(errors="replace")
        counts[payload] += 1
        sources[payload] = src
    print(json.dumps({"counts": counts, "sources": sources}), flush=True)
    return 0


def send_main(args: argparse.Namespace) -> int:
    if not 0 < args.count <= MAX_SEND_COUNT:
        print(f"send: --count must be 1..{MAX_SEND_COUNT}", file=sys.stderr)
        return 2
    sock = _socket6(args) if _is6(args.dst) else _socket4(args)
    if args.mark:
        # Stands in for "decrypted by the SA with this mark" in data path tests.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, args.mark)
    if args.src:
        # A client must send from its virtual IP, or its outbound policy does not match.
        sock.bind((args.src, 0))
    start = time.monotonic()
    failed = 0
    dst: tuple[Any, ...] = (args.dst, args.port)
    if _is6(args.dst) and args.iface:
        dst = (args.dst, args.port, 0, _ifindex(args.iface))  # a link-local group's scope
    for seq in range(args.count):
        payload = f"{args.tag} {seq}" + (" " + "." * (args.pad - 1) if args.pad else "")
        try:
            sock.sendto(payload.encode(), dst)
        except OSError as exc:
            # As a real announcer does: a send refused while the IPsec path is being rebuilt
            # (a client moving, an SA being replaced) is lost, and the next one is tried.
            failed += 1
            if failed == 1:
                print(f"send: {args.tag} {seq}: {exc}", file=sys.stderr)
        if args.interval:
            # Paced on a fixed schedule: a slow step does not lower the rate after it.
            time.sleep(max(0.0, start + (seq + 1) * args.interval - time.monotonic()))
    if failed:
        print(f"send: {failed} of {args.count} sends refused", file=sys.stderr)
    return 1 if failed == args.count else 0


def _socket6(args: argparse.Namespace) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, args.ttl)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, args.ttl)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
    if args.iface:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, _ifindex(args.iface))
    return sock


def _socket4(args: argparse.Namespace) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, args.ttl)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, args.ttl)
    # Never hear ourselves: an echo must come back through the network to be counted.
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    if args.iface:
        mreqn = struct.pack(
            "4s4si",
            socket.inet_aton("0.0.0.0"),
            socket.inet_aton(args.src or "0.0.0.0"),
            _ifindex(args.iface),
        )
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forecast_lab.traffic", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--group", action="append", default=[])
    r.add_argument("--iface", default="eth0")
    r.add_argument("--seconds", type=float, default=30.0)
    r.add_argument("--pktgen", action="store_true", help="count pktgen frames (p<sport> <seq>)")
    r.add_argument("--ipv6", action="store_true", help="an IPv6 socket even with no group")
    s = sub.add_parser("send")
    s.add_argument("--dst", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, default=10)
    s.add_argument("--tag", required=True)
    s.add_argument("--ttl", type=int, default=1)
    s.add_argument("--src")
    s.add_argument("--iface")
    s.add_argument("--interval", type=float, default=0.002)
    s.add_argument("--pad", type=int, default=0)
    s.add_argument("--mark", type=lambda v: int(v, 0), default=0)
    args = parser.parse_args(argv)
    return receive_main(args) if args.cmd == "recv" else send_main(args)


# -- drivers used by scripts and tests ---------------------------------------------------------
def _in_netns(netns: str) -> list[str]:
    """This module as a program inside `netns`."""
    return ["ip", "netns", "exec", netns, sys.executable, "-m", "forecast_lab.traffic"]


class Receiver:
    """A receiver in a namespace; `stop()` returns what it counted."""

    def __init__(
        self,
        netns: str,
        port: int,
        groups: list[str],
        iface: str = "eth0",
        seconds: float = 60.0,
        wait: bool = True,
        pktgen: bool = False,
    ) -> None:
        """pktgen: count the kernel packet generator's frames, tagged `p<source port>`."""
        argv = [
            *_in_netns(netns),
            "recv",
            "--port",
            str(port),
            "--iface",
            iface,
            "--seconds",
            str(seconds),
        ]
        for g in groups:
            argv += ["--group", g]
        if pktgen:
            argv.append("--pktgen")
        self.netns = netns
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._ready = False
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the receiver has joined its groups and listens."""
        if self._ready:
            return
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "READY":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.proc.kill()
            raise RuntimeError(f"receiver in {self.netns} did not start: {line} {err}")
        self._ready = True

    def stop(self) -> Received:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=10)
        if self.proc.returncode != 0:
            raise RuntimeError(f"receiver in {self.netns} failed: {err}")
        data = json.loads(out.strip().splitlines()[-1])
        return Received(Counter(data["counts"]), data["sources"])


def send(
    netns: str,
    dst: str,
    port: int,
    tag: str,
    count: int = 10,
    *,
    src: str | None = None,
    iface: str | None = None,
    ttl: int = 1,
    pad: int = 0,
    mark: int = 0,
    interval: float | None = None,
    background: bool = False,
) -> subprocess.Popen[str] | None:
    """Send `count` tagged datagrams; background: return the running sender instead."""
    argv = [
        *_in_netns(netns),
        "send",
        "--dst",
        dst,
        "--port",
        str(port),
        "--tag",
        tag,
        "--count",
        str(count),
        "--ttl",
        str(ttl),
        "--pad",
        str(pad),
        "--mark",
        hex(mark),
    ]
    if src:
        argv += ["--src", src]
    if iface:
        argv += ["--iface", iface]
    if interval is not None:
        argv += ["--interval", str(interval)]
    if background:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"send from {netns} to {dst} failed: {proc.stderr.strip()}")
    return None


def ping(netns: str, dst: str, count: int = 3, src: str | None = None) -> bool:
    argv = [
        "ip",
        "netns",
        "exec",
        netns,
        "ping",
        "-c",
        str(count),
        "-i",
        "0.2",
        "-W",
        "2",
        *(["-I", src] if src else []),
        dst,
    ]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
