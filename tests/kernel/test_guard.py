"""The storm guard and the client group filter, in the real programs (tests/kernel/veth_gateway.py).

Every copy is witnessed twice: by our per-SA counters and by iptables counting what leaves the
stand-in XFRM interface (or by a receiver on the LAN). Rates are bounds, not timings: what may
pass is at most the burst plus the rate over the flood's whole wall time."""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from forecast.config import RateLimit
from forecast.datapath import SaEntry
from forecast.layout import Direction, DropReason, SaDropReason
from forecast.pinned import possible_cpus
from forecast_lab import traffic
from tests.kernel.veth_gateway import (
    GROUP,
    GROUP6,
    PAD,
    PORT,
    Gateway,
    add_sas,
    fcrules,
)

OSPF = "224.0.0.5"
VRRP = "224.0.0.18"
OSPF6 = "ff02::5"  # AllSPFRouters, OSPFv3


def _allowed(limit: RateLimit, seconds: float) -> int:
    """The most a bucket lets through in `seconds`: its burst, the rate over the time, and one
    packet per CPU that may race an idle bucket (bpf/lib/guard.h)."""
    return limit.burst + int(limit.rate * seconds) + 1 + possible_cpus()


def test_flooding_client_is_held_to_its_rate_while_a_quiet_one_gets_through(
    gateway: Gateway, figures: Callable[[str], None]
) -> None:
    """The flood is broadcast (255.255.255.255, every client and the LAN would get it), with
    reinject on for both clients."""
    limit = RateLimit(rate=50, burst=20)
    gateway.configure(sa_rate=limit)
    add_sas(gateway)  # slots 0 (0x11) and 1 (0x12) reinject, slot 5 (0x13) does not
    everything = (IPv4Network("224.0.0.0/4"), IPv4Network("255.255.255.255/32"))
    for slot, mark in ((0, 0x11), (1, 0x12)):
        gateway.datapath.write_sa(slot, SaEntry(mark, mark, everything, reinject=True))
    lan_rx = traffic.Receiver(gateway.lan, PORT, [GROUP])
    offered = 4000
    t0 = time.monotonic()
    # From xfpeer's address: the limited broadcast leaves by the source address's device.
    flood = traffic.send(
        gateway.gw,
        "255.255.255.255",
        PORT,
        "flood",
        offered,
        src="10.8.0.2",
        mark=0x11,
        pad=PAD,
        interval=0.00025,
        background=True,
    )
    quiet = traffic.send(
        gateway.gw,
        GROUP,
        PORT,
        "quiet",
        10,
        iface="xfpeer",
        mark=0x12,
        pad=PAD,
        interval=0.05,
        background=True,
    )
    assert flood is not None and quiet is not None
    for proc in (flood, quiet):
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    seconds = time.monotonic() - t0
    time.sleep(0.3)
    got = lan_rx.stop()

    counters = gateway.datapath.counters([0, 1, 5])
    to_lan = counters[0].by_direction[Direction.SA_TO_LAN].packets
    to_sa = counters[1].by_direction[Direction.SA_TO_SA].packets  # the flood's, to slot 1
    storm = gateway.datapath.sa_drops([0])[0][SaDropReason.STORM]
    # Each admitted packet got every copy it should (the LAN and the one other reinjecting SA),
    # each refused one none: the two add up to what was offered.
    assert to_lan + storm == offered
    assert limit.burst <= to_lan <= _allowed(limit, seconds), (to_lan, seconds)
    assert got.total("flood") == to_lan  # the LAN received exactly what we counted
    # The quiet client lost nothing, and nothing of it was held back.
    assert got.exactly_once("quiet", 10)
    assert counters[0].by_direction[Direction.SA_TO_SA].packets == 10  # its copies to slot 0
    assert gateway.datapath.sa_drops([1])[1][SaDropReason.STORM] == 0
    # iptables saw one copy per admitted flood packet for 0x12; for 0x11 the quiet client's
    # copies and the flood's own broadcast, which the kernel loops back to its sender's device.
    assert fcrules(gateway) == {0x11: 10 + offered, 0x12: to_sa, 0x13: 0, 0: 0}
    assert to_sa == to_lan
    assert gateway.datapath.drops()[DropReason.STORM_SA] == storm
    copies = to_lan + to_sa
    figures(
        f"client broadcast flood of {offered} packets in {seconds:.2f} s at limit "
        f"{limit.rate}/s burst {limit.burst}: {to_lan} admitted, {storm} held back; copies per "
        f"offered packet {copies / offered:.4f} (unguarded: 2); quiet client 10/10"
    )


def test_lan_storm_is_held_to_the_lan_rate_and_the_original_still_arrives(
    gateway: Gateway, figures: Callable[[str], None]
) -> None:
    limit = RateLimit(rate=100, burst=50)
    gateway.configure(lan_rate=limit)
    add_sas(gateway)
    local = traffic.Receiver(gateway.gw, PORT, [GROUP], iface="lan0")
    offered = 2000
    t0 = time.monotonic()
    traffic.send(gateway.lan, GROUP, PORT, "storm", offered, iface="eth0", pad=PAD, interval=0.0005)
    seconds = time.monotonic() - t0
    time.sleep(0.3)
    got_local = local.stop()

    copies = fcrules(gateway)
    admitted = copies[0x11]
    # All or nothing per packet: every SA got the same admitted packets.
    assert copies == {0x11: admitted, 0x12: admitted, 0x13: admitted, 0: 0}
    assert limit.burst <= admitted <= _allowed(limit, seconds), (admitted, seconds)
    assert gateway.datapath.drops()[DropReason.STORM_LAN] == offered - admitted
    # The guard only withholds copies: the gateway's own stack got every packet.
    assert got_local.exactly_once("storm", offered)
    figures(
        f"LAN storm of {offered} packets in {seconds:.2f} s at limit {limit.rate}/s burst "
        f"{limit.burst}: {admitted} admitted to each of 3 SAs; copies per offered packet "
        f"{3 * admitted / offered:.4f} (unguarded: 3)"
    )


def test_clients_reach_only_the_configured_groups_by_default(
    gateway: Gateway, figures: Callable[[str], None]
) -> None:
    groups = gateway.config.groups
    gateway.configure(client_groups_to_lan=groups, client_groups_to_sas=groups)
    add_sas(gateway)
    lan_rx = traffic.Receiver(gateway.lan, PORT, [GROUP, OSPF, VRRP])
    for tag, dst in (("ok", GROUP), ("ospf", OSPF), ("vrrp", VRRP)):
        traffic.send(gateway.gw, dst, PORT, tag, 6, iface="xfpeer", mark=0x11, pad=PAD)
    time.sleep(0.3)
    got = lan_rx.stop()
    assert got.exactly_once("ok", 6)
    assert got.total("ospf") == 0 and got.total("vrrp") == 0
    assert fcrules(gateway) == {0x11: 0, 0x12: 6, 0x13: 0, 0: 0}
    dropped = gateway.datapath.sa_drops([0, 1])
    assert dropped[0][SaDropReason.GROUP_TO_LAN] == 12
    assert dropped[0][SaDropReason.GROUP_TO_SAS] == 12
    assert dropped[1] == {r: 0 for r in SaDropReason}
    totals = gateway.datapath.drops()
    assert totals[DropReason.GROUP_TO_LAN] == totals[DropReason.GROUP_TO_SAS] == 12
    figures("client to OSPF/VRRP groups: 0 of 12 copied to the LAN, 0 of 12 to clients")


def test_ipv6_clients_reach_only_the_configured_groups_too(gateway: Gateway) -> None:
    """The same filter for IPv6: mDNS (in the groups) passes, OSPFv3's ff02::5 does not, and
    the refusals are counted per SA as for IPv4; the storm guard takes IPv6 packets from the
    same bucket."""
    groups = gateway.config.groups
    gateway.configure(
        client_groups_to_lan=groups, client_groups_to_sas=groups, sa_rate=RateLimit(1, 8)
    )
    add_sas(gateway)
    lan_rx = traffic.Receiver(gateway.lan, PORT, [GROUP6, OSPF6])
    for tag, dst in (("ok6", GROUP6), ("ospf6", OSPF6)):
        traffic.send(gateway.gw, dst, PORT, tag, 4, iface="xfpeer", src="fd08::2", mark=0x11)
    time.sleep(0.3)
    got = lan_rx.stop()
    assert got.exactly_once("ok6", 4) and got.total("ospf6") == 0
    assert fcrules(gateway, (6,)) == {0x11: 0, 0x12: 4, 0x13: 0, 0: 0}
    dropped = gateway.datapath.sa_drops([0])[0]
    assert dropped[SaDropReason.GROUP_TO_LAN] == dropped[SaDropReason.GROUP_TO_SAS] == 4
    # A burst of 8: the 4 mDNS packets took 4 tokens (the filtered ones none); of 20 more, 4
    # pass, and one more per second the sends took (each sender is a process start)
    traffic.send(gateway.gw, GROUP6, PORT, "more6", 20, iface="xfpeer", src="fd08::2", mark=0x11)
    time.sleep(0.3)
    storm = gateway.datapath.sa_drops([0])[0][SaDropReason.STORM]
    admitted = fcrules(gateway, (6,))[0x12]
    assert admitted + storm == 4 + 20 and storm >= 10, (admitted, storm)


def test_each_direction_can_be_widened_on_its_own(gateway: Gateway) -> None:
    # The LAN takes any group from clients (the plugin's behaviour); clients get none of it.
    gateway.configure(client_groups_to_lan=None, client_groups_to_sas=())
    add_sas(gateway)
    everything = (IPv4Network("224.0.0.0/4"), IPv4Network("255.255.255.255/32"))
    gateway.datapath.write_sa(0, SaEntry(0x11, 0x11, everything, reinject=True))
    lan_rx = traffic.Receiver(gateway.lan, PORT, [OSPF])
    traffic.send(gateway.gw, OSPF, PORT, "ospf", 5, iface="xfpeer", mark=0x11, pad=PAD)
    # Broadcast still goes every way: from slot 1 to the LAN and to slot 0 (reinject, and it
    # negotiated the broadcast address). Sent from xfpeer's address: the limited broadcast
    # leaves by the source address's device.
    traffic.send(gateway.gw, "255.255.255.255", PORT, "bc", 4, src="10.8.0.2", mark=0x12, pad=PAD)
    time.sleep(0.3)
    got = lan_rx.stop()
    assert got.exactly_once("ospf", 5) and got.exactly_once("bc", 4)
    # 0x12: the sender's own broadcast, which the kernel always loops back to its device.
    assert fcrules(gateway) == {0x11: 4, 0x12: 4, 0x13: 0, 0: 0}
    assert gateway.datapath.counters([0])[0].by_direction[Direction.SA_TO_SA].packets == 4
    dropped = gateway.datapath.sa_drops([0])[0]
    assert dropped[SaDropReason.GROUP_TO_SAS] == 5 and dropped[SaDropReason.GROUP_TO_LAN] == 0


def test_lan_groups_and_client_groups_are_separate(gateway: Gateway) -> None:
    # A group clients may send (to both) that the LAN does not forward to clients.
    extra = IPv4Address("239.1.2.3")
    gateway.configure(client_groups_to_lan=(extra,), client_groups_to_sas=(extra,))
    add_sas(gateway)
    traffic.send(gateway.lan, str(extra), PORT, "lan", 5, iface="eth0", pad=PAD)
    traffic.send(gateway.gw, str(extra), PORT, "cl", 3, iface="xfpeer", mark=0x11, pad=PAD)
    traffic.send(gateway.gw, GROUP, PORT, "g", 2, iface="xfpeer", mark=0x11, pad=PAD)
    time.sleep(0.3)
    # LAN → clients: not in `groups`, no copy. Client → client: 3 of the extra group, none of
    # GROUP (a LAN group, not a client group here).
    assert fcrules(gateway) == {0x11: 0, 0x12: 3, 0x13: 0, 0: 0}


def test_a_new_sa_in_a_slot_starts_with_a_full_bucket(gateway: Gateway) -> None:
    limit = RateLimit(rate=1, burst=5)
    gateway.configure(sa_rate=limit)
    add_sas(gateway)
    traffic.send(gateway.gw, GROUP, PORT, "a", 20, iface="xfpeer", mark=0x11, pad=PAD, interval=0.0)
    assert fcrules(gateway)[0x12] <= limit.burst + 1
    # Another SA takes slot 0: its counters and its bucket start afresh.
    gateway.datapath.write_sa(0, SaEntry(0x21, 0x21, (IPv4Network("224.0.0.0/4"),), True))
    gateway.datapath.sync_targets()  # the same slots: the lists need no change
    assert gateway.datapath.sa_drops([0])[0][SaDropReason.STORM] == 0
    before = fcrules(gateway)[0x12]
    traffic.send(gateway.gw, GROUP, PORT, "b", 5, iface="xfpeer", mark=0x21, pad=PAD, interval=0.0)
    time.sleep(0.2)
    assert fcrules(gateway)[0x12] - before == 5
