"""Hostile and odd frames, over 10,000 through both programs, class by class, each with what it
must cause: how many copies (counted by our maps and by iptables on the receiving ends) and
which drop counter says why. Delivered twice: on the wire (AF_PACKET from the LAN host, and
from the stand-in XFRM peer with the client's mark) and straight into the program
(BPF_PROG_TEST_RUN, tests/kernel/prog_run.py), which also reaches what no veth can carry: a
decrypted packet without a MAC header. Then 9,000-byte frames."""

from __future__ import annotations

import json
import random
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from forecast.layout import Direction, DropReason
from forecast_lab import netns, traffic
from tests.kernel import prog_run
from tests.kernel.prog_run import (
    BROADCAST_MAC,
    ETH_ARP,
    ETH_IP,
    ETH_IPV6,
    ETH_VLAN,
    eth,
    ip4,
    ip6,
    multicast_mac,
    multicast_mac6,
    udp,
)
from tests.kernel.veth_gateway import (
    BCAST,
    GROUP,
    GROUP6,
    OTHER_GROUP6,
    PORT,
    Gateway,
    add_sas,
    fcrules,
)

LAN_HOST_MAC = bytes.fromhex("02aa00000002")
SOURCE = "10.77.{}.{}"
OSPF = "224.0.0.5"


@dataclass
class Case:
    name: str
    count: int
    build: Callable[[random.Random], bytes]
    sa_copies: int = 0  # copies to SAs per frame
    lan_copies: int = 0  # copies to the LAN per frame (tunnel program)
    drop: DropReason | None = None  # the drop counter each frame bumps
    mark: int = 0x11  # tunnel program: the SA the frame was "decrypted" by
    # frames whose drop cannot be known in advance (random bytes): counted by this instead
    drop_oracle: Callable[[bytes], bool] | None = field(default=None, repr=False)
    # how the frames may be delivered: the test run needs a whole L3 header (the kernel
    # refuses shorter buffers); a veth always carries a MAC header
    deliveries: tuple[str, ...] = ("wire", "test_run")


def _src(rng: random.Random) -> str:
    return SOURCE.format(rng.randrange(256), rng.randrange(1, 255))


def _payload(rng: random.Random, lo: int = 0, hi: int = 1200) -> bytes:
    return rng.randbytes(rng.randrange(lo, hi))


def _mc(rng: random.Random, **ip: object) -> bytes:
    return ip4(_src(rng), GROUP, udp(rng.randrange(1024, 65535), PORT, _payload(rng)), **ip)  # type: ignore[arg-type]


def _on_lan(dst_mac: bytes, packet: bytes, ethertype: int = ETH_IP) -> bytes:
    return eth(dst_mac, LAN_HOST_MAC, ethertype, packet)


def _valid_ipv4(frame: bytes, l3: int, exact: bool) -> bool:
    """What fc_load_ip accepts (bpf/lib/classify.h): for random bytes, the expected verdict."""
    if len(frame) < l3 + 20:
        return False
    version, ihl = frame[l3] >> 4, frame[l3] & 0xF
    (tot_len,) = struct.unpack_from("!H", frame, l3 + 2)
    end = l3 + tot_len
    return (
        version == 4
        and ihl >= 5
        and ihl * 4 <= tot_len
        and end <= len(frame)
        and (not exact or end == len(frame))
    )


def _src6(rng: random.Random) -> str:
    return f"fe80::{rng.randrange(1, 0xFFFF):x}"


def _mc6(rng: random.Random, dst: str = GROUP6, **ip: object) -> bytes:
    return ip6(_src6(rng), dst, udp(rng.randrange(1024, 65535), PORT, _payload(rng)), **ip)  # type: ignore[arg-type]


def _valid_ipv6(frame: bytes, l3: int, exact: bool) -> bool:
    """What fc_load_ip6 accepts (bpf/lib/classify.h)."""
    if len(frame) < l3 + 40:
        return False
    (payload_len,) = struct.unpack_from("!H", frame, l3 + 4)
    end = l3 + 40 + payload_len
    return (
        frame[l3] >> 4 == 6
        and payload_len > 0
        and end <= len(frame)
        and (not exact or end == len(frame))
    )


def _on_lan6(packet: bytes, ethertype: int = ETH_IPV6) -> bytes:
    return eth(multicast_mac6(GROUP6), LAN_HOST_MAC, ethertype, packet)


def _garbage(rng: random.Random) -> bytes:
    return _on_lan(multicast_mac(GROUP), rng.randbytes(rng.randrange(46, 1486)))


def lan_cases(lan_mac: bytes) -> list[Case]:
    mc_mac = multicast_mac(GROUP)

    def ipv6_long(rng: random.Random) -> bytes:
        body = udp(5000, PORT, _payload(rng))
        extra = rng.randrange(1, 1000)
        return _on_lan6(ip6(_src6(rng), GROUP6, body, payload_len=len(body) + extra))

    def ipv6_padded(rng: random.Random) -> bytes:
        # Ethernet padding after an IPv6 packet, as after IPv4: accepted.
        packet = _mc6(rng)
        return _on_lan6(packet + rng.randbytes(rng.randrange(1, 40)))

    def later_fragment(rng: random.Random) -> bytes:
        # Looks like DHCP where a UDP header would be: a later fragment has none, so it is
        # forwarded like any fragment of a multicast datagram.
        body = udp(68, 67, _payload(rng))
        off = rng.randrange(1, 0x2000) | rng.choice((0, 0x2000))
        return _on_lan(mc_mac, ip4(_src(rng), GROUP, body, frag_off=off))

    def truncated(rng: random.Random) -> bytes:
        return _on_lan(mc_mac, _mc(rng))[: rng.randrange(14, 34)]

    def long_total(rng: random.Random) -> bytes:
        body = udp(5000, PORT, _payload(rng))
        return _on_lan(
            mc_mac, ip4(_src(rng), GROUP, body, tot_len=28 + len(body) + rng.randrange(1, 1000))
        )

    def short_total(rng: random.Random) -> bytes:
        # Ethernet padding: the stack trims to the IP length and accepts it; so do we.
        body = udp(5000, PORT, _payload(rng, 8, 200))
        return _on_lan(
            mc_mac,
            ip4(
                _src(rng), GROUP, body + rng.randbytes(rng.randrange(1, 40)), tot_len=20 + len(body)
            ),
        )

    def header_past_total(rng: random.Random) -> bytes:
        return _on_lan(mc_mac, ip4(_src(rng), GROUP, rng.randbytes(40), ihl=15, tot_len=40))

    def vlan_tagged(rng: random.Random) -> bytes:
        tag = struct.pack("!HH", rng.randrange(1, 4095), ETH_IP)
        return eth(mc_mac, LAN_HOST_MAC, ETH_VLAN, tag + _mc(rng))

    def dhcp(rng: random.Random) -> bytes:
        sport, dport = rng.choice(((68, 67), (67, 68)))
        return _on_lan(
            BROADCAST_MAC, ip4("0.0.0.0", "255.255.255.255", udp(sport, dport, _payload(rng)))
        )

    return [
        Case("multicast", 600, lambda r: _on_lan(mc_mac, _mc(r, ttl=r.randrange(1, 256))), 3),
        Case(
            "broadcast",
            300,
            lambda r: _on_lan(BROADCAST_MAC, ip4(_src(r), BCAST, udp(9, PORT, _payload(r)))),
            2,
        ),
        Case(
            "ip_options",
            500,
            lambda r: _on_lan(mc_mac, _mc(r, options=b"\x01" * 4 * r.randrange(1, 11))),
            3,
        ),
        Case("first_fragment", 300, lambda r: _on_lan(mc_mac, _mc(r, frag_off=0x2000)), 3),
        Case("later_fragment", 300, later_fragment, 3),
        Case("ttl_0", 200, lambda r: _on_lan(mc_mac, _mc(r, ttl=0)), 0, drop=DropReason.TTL),
        Case("ttl_1", 200, lambda r: _on_lan(mc_mac, _mc(r, ttl=1)), 3),
        Case("truncated", 600, truncated, 0, drop=DropReason.MALFORMED, deliveries=("wire",)),
        Case("total_length_past_frame", 400, long_total, 0, drop=DropReason.MALFORMED),
        Case("total_length_short_of_frame", 300, short_total, 3),
        Case("header_past_total_length", 200, header_past_total, 0, drop=DropReason.MALFORMED),
        Case(
            "ihl_below_5",
            200,
            lambda r: _on_lan(mc_mac, _mc(r, ihl=r.randrange(0, 5))),
            0,
            drop=DropReason.MALFORMED,
        ),
        Case(
            "version_6_in_ipv4",
            200,
            lambda r: _on_lan(mc_mac, _mc(r, version=6)),
            0,
            drop=DropReason.MALFORMED,
        ),
        # IPv6: the group forwarded to the two SAs with IPv6 multicast selectors
        Case(
            "ipv6_multicast",
            400,
            lambda r: _on_lan6(_mc6(r, hop_limit=r.randrange(1, 256))),
            2,
        ),
        Case("ipv6_group_not_forwarded", 200, lambda r: _on_lan6(_mc6(r, OTHER_GROUP6))),
        Case(
            "ipv6_hop_limit_0",
            200,
            lambda r: _on_lan6(_mc6(r, hop_limit=0)),
            0,
            drop=DropReason.TTL,
        ),
        Case(
            "ipv6_truncated",
            300,
            lambda r: _on_lan6(_mc6(r))[: r.randrange(14, 54)],
            0,
            drop=DropReason.MALFORMED,
            deliveries=("wire",),
        ),
        Case("ipv6_payload_past_frame", 200, ipv6_long, 0, drop=DropReason.MALFORMED),
        Case("ipv6_padded", 200, ipv6_padded, 2),
        Case(
            "ipv6_jumbogram_length_0",
            100,
            lambda r: _on_lan6(_mc6(r, payload_len=0)),
            0,
            drop=DropReason.MALFORMED,
        ),
        Case(
            "ipv6_version_4",
            100,
            lambda r: _on_lan6(_mc6(r, version=4)),
            0,
            drop=DropReason.MALFORMED,
        ),
        Case(
            "ipv6_unicast",
            200,
            lambda r: _on_lan6(ip6(_src6(r), "fd09::1", udp(9, PORT, _payload(r)))),
        ),
        Case(
            "ipv6_random_bytes",
            300,
            lambda r: _on_lan6(r.randbytes(r.randrange(40, 600))),
            drop=DropReason.MALFORMED,
            drop_oracle=lambda f: not _valid_ipv6(f, 14, False),
        ),
        Case("arp", 200, lambda r: _on_lan(BROADCAST_MAC, r.randbytes(28), ETH_ARP)),
        Case("vlan_tagged", 200, vlan_tagged),
        Case("dhcp", 200, dhcp),
        Case(
            "multicast_ip_other_hosts_mac",
            200,
            lambda r: _on_lan(bytes.fromhex("02bb00000009"), _mc(r)),
        ),
        Case("multicast_ip_our_mac", 100, lambda r: _on_lan(lan_mac, _mc(r)), 3),
        Case(
            "unicast_ip_multicast_mac",
            200,
            lambda r: _on_lan(mc_mac, ip4(_src(r), "10.9.0.1", udp(9, PORT, b"x"))),
        ),
        Case(
            "group_not_forwarded",
            200,
            lambda r: _on_lan(multicast_mac(OSPF), ip4(_src(r), OSPF, udp(9, PORT, b"x"))),
        ),
        Case(
            "random_bytes",
            800,
            _garbage,
            drop=DropReason.MALFORMED,
            drop_oracle=lambda f: not _valid_ipv4(f, 14, False),
        ),
    ]


def tunnel_cases() -> list[Case]:
    outer = bytes.fromhex("02cc00000001")

    def decrypted(packet: bytes) -> bytes:
        return eth(outer, outer, ETH_IP, packet)  # the outer MAC header stays (docs/design.md)

    def l3_at_zero(rng: random.Random) -> bytes:
        # No MAC header: the IP header at offset 0. The test run reads bytes 12-13 as the
        # EtherType, so the source address starts 8.0 (0x0800, IPv4); byte 14 (0) is no
        # IPv4 header, so the program must find it at 0 and push a MAC header for the LAN.
        return ip4(f"8.0.0.{rng.randrange(1, 255)}", GROUP, udp(5000, PORT, _payload(rng, 16, 600)))

    def garbage(rng: random.Random) -> bytes:
        return rng.randbytes(rng.randrange(60, 1500))

    def decrypted6(packet: bytes) -> bytes:
        return eth(outer, outer, ETH_IPV6, packet)

    def ipv6_l3_at_zero(rng: random.Random) -> bytes:
        # As l3_at_zero: bytes 12-13 of the source address read 0x86dd, the EtherType the
        # test run takes; the program must find the IPv6 header at 0.
        body = udp(5000, PORT, _payload(rng, 16, 600))
        return ip6(f"2001:db8:86dd::{rng.randrange(1, 0xFFFF):x}", GROUP6, body)

    def padded(rng: random.Random) -> bytes:
        body = udp(5000, PORT, _payload(rng, 8, 200))
        return decrypted(
            ip4(_src(rng), GROUP, body + b"\0" * rng.randrange(1, 40), tot_len=20 + len(body))
        )

    def long_total(rng: random.Random) -> bytes:
        body = udp(5000, PORT, _payload(rng))
        return decrypted(
            ip4(_src(rng), GROUP, body, tot_len=28 + len(body) + rng.randrange(1, 1000))
        )

    return [
        Case("multicast", 500, lambda r: decrypted(_mc(r)), 1, 1),
        Case("multicast_l3_at_0", 300, l3_at_zero, 1, 1, deliveries=("test_run",)),
        Case(
            "broadcast",
            200,
            lambda r: decrypted(ip4(_src(r), BCAST, udp(9, PORT, _payload(r)))),
            0,
            1,
        ),
        Case(
            "ip_options",
            300,
            lambda r: decrypted(_mc(r, options=b"\x01" * 4 * r.randrange(1, 11))),
            1,
            1,
        ),
        Case(
            "fragments",
            300,
            lambda r: decrypted(_mc(r, frag_off=r.choice((0x2000, r.randrange(1, 0x2000))))),
            1,
            1,
        ),
        Case("ttl_0", 200, lambda r: decrypted(_mc(r, ttl=0)), drop=DropReason.TTL),
        Case(
            "truncated",
            400,
            lambda r: decrypted(_mc(r))[: r.randrange(14, 34)],
            drop=DropReason.MALFORMED,
            deliveries=("wire",),
        ),
        Case("padded", 300, padded, drop=DropReason.MALFORMED),
        Case("total_length_past_frame", 300, long_total, drop=DropReason.MALFORMED),
        Case(
            "unknown_mark",
            300,
            lambda r: decrypted(_mc(r)),
            drop=DropReason.UNKNOWN_ORIGIN,
            mark=0x99,
        ),
        Case("no_mark", 200, lambda r: decrypted(_mc(r)), drop=DropReason.UNKNOWN_ORIGIN, mark=0),
        # IPv6, from the SA with mark 0x11: the LAN and slot 1 (slot 5 has no IPv6 selector)
        Case("ipv6_multicast", 400, lambda r: decrypted6(_mc6(r)), 1, 1),
        Case("ipv6_multicast_l3_at_0", 200, ipv6_l3_at_zero, 1, 1, deliveries=("test_run",)),
        Case(
            "ipv6_hop_limit_0", 200, lambda r: decrypted6(_mc6(r, hop_limit=0)), drop=DropReason.TTL
        ),
        Case(
            "ipv6_padded",
            200,
            lambda r: decrypted6(_mc6(r) + b"\0" * r.randrange(1, 40)),
            drop=DropReason.MALFORMED,
        ),
        Case(
            "ipv6_unknown_mark",
            200,
            lambda r: decrypted6(_mc6(r)),
            drop=DropReason.UNKNOWN_ORIGIN,
            mark=0x99,
        ),
        Case(
            "ipv6_dhcp",
            100,
            lambda r: decrypted6(ip6(_src6(r), "ff02::1:2", udp(546, 547, _payload(r)))),
        ),
        Case(
            "ipv6_random_bytes",
            300,
            lambda r: eth(outer, outer, ETH_IPV6, r.randbytes(r.randrange(40, 600))),
            drop=DropReason.MALFORMED,
            drop_oracle=lambda f: not (_valid_ipv6(f, 14, True) or _valid_ipv6(f, 0, True)),
        ),
        Case("arp", 100, lambda r: eth(outer, outer, ETH_ARP, r.randbytes(28))),
        Case(
            "dhcp",
            200,
            lambda r: decrypted(ip4(_src(r), "255.255.255.255", udp(68, 67, _payload(r)))),
        ),
        Case(
            "unicast", 200, lambda r: decrypted(ip4(_src(r), "10.9.0.1", udp(9, PORT, _payload(r))))
        ),
        Case(
            "random_bytes",
            500,
            garbage,
            drop=DropReason.MALFORMED,
            drop_oracle=lambda f: (
                f[12:14] == b"\x08\x00"
                and not (_valid_ipv4(f, 14, True) or _valid_ipv4(f, 0, True))
            ),
        ),
    ]


# -- witnesses ---------------------------------------------------------------------------------
def _lan_witness(gateway: Gateway) -> None:
    """Count, on the LAN host, every UDP datagram to our port that arrives on eth0 (either
    family)."""
    for tool in ("iptables", "ip6tables"):
        netns.run(
            [
                tool,
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-i",
                "eth0",
                "-p",
                "udp",
                "--dport",
                str(PORT),
            ],
            netns=gateway.lan,
        )


def _lan_received(gateway: Gateway) -> int:
    total = 0
    for tool in ("iptables-save", "ip6tables-save"):
        out = netns.run([tool, "-c", "-t", "mangle"], netns=gateway.lan).stdout
        m = re.search(rf"\[(\d+):\d+\] -A PREROUTING -i eth0 -p udp -m udp --dport {PORT}", out)
        assert m, out
        total += int(m[1])
    return total


@dataclass
class Tally:
    sa_ours: int
    sa_witness: int
    lan_ours: int
    lan_witness: int
    drops: dict[DropReason, int]


def _tally(gateway: Gateway) -> Tally:
    counters = gateway.datapath.counters([0, 1, 5])
    return Tally(
        sa_ours=sum(
            c.by_direction[d].packets
            for c in counters.values()
            for d in (Direction.LAN_TO_SA, Direction.SA_TO_SA)
        ),
        sa_witness=sum(fcrules(gateway).values()),
        lan_ours=sum(c.by_direction[Direction.SA_TO_LAN].packets for c in counters.values()),
        lan_witness=_lan_received(gateway),
        drops=gateway.datapath.drops(),
    )


def _delta(before: Tally, after: Tally) -> tuple[int, int, int, int, dict[DropReason, int]]:
    """Copies to SAs (ours, witnessed), to the LAN (ours, witnessed), drops by reason."""
    return (
        after.sa_ours - before.sa_ours,
        after.sa_witness - before.sa_witness,
        after.lan_ours - before.lan_ours,
        after.lan_witness - before.lan_witness,
        {
            r: after.drops[r] - before.drops[r]
            for r in DropReason
            if after.drops[r] != before.drops[r]
        },
    )


def _deliver(gateway: Gateway, role: str, delivery: str, case: Case, frames: list[bytes]) -> None:
    device = "lan0" if role == "lan" else "xf0"
    if delivery == "test_run":
        fd = gateway.datapath.fds[role]
        short = [len(f) for f in frames if len(f) < 34]
        assert not short, f"{case.name}: frames of {short[:3]} B cannot be test-run"
        results = prog_run.run_many(
            gateway.gw, fd, frames, ifindex=gateway.ifindex[device], mark=case.mark
        )
        assert {r.retval for r in results} == {prog_run.TC_ACT_OK}, case.name
    elif role == "lan":
        prog_run.send_frames(gateway.lan, "eth0", frames)
    else:
        prog_run.send_frames(gateway.gw, "xfpeer", frames, mark=case.mark)


def _run_cases(gateway: Gateway, role: str, cases: list[Case], delivery: str, seed: int) -> int:
    rng = random.Random(seed)
    total = 0
    for case in cases:
        if delivery not in case.deliveries:
            continue
        frames = [case.build(rng) for _ in range(case.count)]
        want_sa, want_lan = case.sa_copies * case.count, case.lan_copies * case.count
        if case.drop_oracle is not None:
            n = sum(1 for f in frames if case.drop_oracle(f))
            want_drops = {case.drop: n} if case.drop and n else {}
        else:
            want_drops = {case.drop: case.count} if case.drop else {}
        before = _tally(gateway)
        _deliver(gateway, role, delivery, case, frames)

        want = (want_sa, want_sa, want_lan, want_lan, want_drops)
        # Frames cross veths and backlogs: wait (bounded) for all of it, then a little more
        # for anything that should not come at all.
        deadline = time.monotonic() + 5
        while _delta(before, _tally(gateway)) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.05)
        assert _delta(before, _tally(gateway)) == want, f"{role} {delivery} {case.name}"
        total += case.count
    return total


def _mac(gateway: Gateway, device: str) -> bytes:
    out = netns.run(["ip", "-j", "link", "show", device], netns=gateway.gw).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


@pytest.mark.parametrize("delivery", ["wire", "test_run"])
def test_hostile_and_odd_frames_through_both_programs(
    gateway: Gateway, delivery: str, figures: Callable[[str], None]
) -> None:
    add_sas(gateway)
    _lan_witness(gateway)
    lan_mac = _mac(gateway, "lan0")
    # A copy keeps the original's MAC header, which a real XFRM interface ignores; the veth
    # peer only takes in what is addressed to it, so it wears lan0's MAC too (for frames sent
    # to the gateway's own MAC).
    netns.run(["ip", "link", "set", "xfpeer", "address", lan_mac.hex(":")], netns=gateway.gw)
    t0 = time.monotonic()
    n_lan = _run_cases(gateway, "lan", lan_cases(lan_mac), delivery, seed=1)
    n_tunnel = _run_cases(gateway, "tunnel", tunnel_cases(), delivery, seed=2)
    assert n_lan + n_tunnel >= 10_000
    figures(
        f"{delivery}: {n_lan} frames into the LAN program, {n_tunnel} into the tunnel program "
        f"in {time.monotonic() - t0:.1f} s; every copy and drop as expected, class by class"
    )


def test_a_copy_of_a_packet_without_mac_header_gets_one_for_the_lan(gateway: Gateway) -> None:
    """The l3 == 0 branch: bpf_skb_change_head makes room, the LAN copy gets a multicast MAC
    from the group and the LAN MAC as source, and the rest of the packet is unchanged."""
    add_sas(gateway)
    packet = ip4("8.0.0.7", GROUP, udp(5000, PORT, b"nomac 0"))
    rx = traffic.Receiver(gateway.lan, PORT, [GROUP])
    (result,) = prog_run.run_many(
        gateway.gw,
        gateway.datapath.fds["tunnel"],
        [packet],
        ifindex=gateway.ifindex["xf0"],
        mark=0x11,
    )
    time.sleep(0.3)
    got = rx.stop()
    assert result.retval == prog_run.TC_ACT_OK
    # What the program left in the buffer: the MAC header it pushed, then the same packet.
    assert result.data_out == multicast_mac(GROUP) + gateway.config.lan_mac + b"\x08\x00" + packet
    assert got.total("nomac") == 1  # the LAN host accepted it: a well-formed multicast frame
    assert gateway.datapath.counters([0])[0].by_direction[Direction.SA_TO_LAN].packets == 1
    assert gateway.datapath.drops()[DropReason.NO_HEADROOM] == 0


@pytest.fixture
def jumbo(gateway: Gateway) -> Gateway:
    for ns, dev in (
        (gateway.gw, "lan0"),
        (gateway.lan, "eth0"),
        (gateway.gw, "xf0"),
        (gateway.gw, "xfpeer"),
    ):
        netns.run(["ip", "link", "set", dev, "mtu", "9000"], netns=ns)
    return gateway


def test_nine_thousand_byte_frames_are_copied_whole(jumbo: Gateway) -> None:
    add_sas(jumbo)
    lan_rx = traffic.Receiver(jumbo.lan, PORT, [GROUP])
    traffic.send(jumbo.lan, GROUP, PORT, "big", 5, iface="eth0", pad=8900)
    traffic.send(jumbo.gw, GROUP, PORT, "up", 4, iface="xfpeer", mark=0x11, pad=8900)
    time.sleep(0.3)
    assert lan_rx.stop().exactly_once("up", 4)
    assert fcrules(jumbo) == {0x11: 5, 0x12: 5 + 4, 0x13: 5, 0: 0}
    ip_len = 20 + 8 + len("big 0") + 8900
    assert jumbo.datapath.counters([1])[1].by_direction[Direction.LAN_TO_SA].bytes == 5 * ip_len
