"""The real TC programs on this kernel, with veth stand-ins for the XFRM interface.

    L: eth0 10.9.0.2 ── G: lan0 10.9.0.1/16   (LAN program on lan0 ingress)
                        G: xf0 ── xfpeer       (tunnel program on xf0 ingress; copies for SAs
                                                leave xf0 and are counted, per mark, by
                                                iptables rules on xfpeer in G)

xf0 and xfpeer share a namespace, so skb->mark survives the veth crossing in both directions:
a packet sent from xfpeer with SO_MARK M reaches xf0 as "decrypted by the SA with mark M".
The counting is iptables', not ours: an independent witness of every copy and its mark.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from forecast import tc
from forecast.datapath import Datapath, DatapathConfig, SaEntry
from forecast.lab import netns, traffic
from forecast.layout import Direction, DropReason

GROUP = "239.255.255.250"
OTHER_GROUP = "224.0.0.251"  # not in the configured groups
BCAST = "10.9.255.255"
PORT = 1900
MARKS = (0x11, 0x12, 0x13)
PAD = 40  # payload "tag seq" + padding: a fixed IP length per packet is easier to check


@dataclass
class Gateway:
    gw: str
    lan: str
    datapath: Datapath
    ifindex: dict[str, int]


@pytest.fixture
def gateway(run_prefix: str, tmp_path: Path) -> Iterator[Gateway]:
    gw, lan = f"{run_prefix}-dg", f"{run_prefix}-dl"
    pins = tmp_path / "bpffs"
    pins.mkdir()
    netns.create(gw)
    netns.create(lan)
    # A private bpffs instance: the pins vanish with the unmount, whatever the test did.
    subprocess.run(["mount", "-t", "bpf", "bpf", str(pins)], check=True)
    datapath = Datapath(pins / "forecast")
    try:
        netns.add_veth("lan0", gw, "eth0", lan)
        netns.add_veth("xf0", gw, "xfpeer", gw)
        for ns, dev, cidr in (
            (gw, "lan0", "10.9.0.1/16"),
            (lan, "eth0", "10.9.0.2/16"),
            (gw, "xf0", "10.8.0.1/24"),
            (gw, "xfpeer", "10.8.0.2/24"),
        ):
            netns.run(["ip", "addr", "add", cidr, "brd", "+", "dev", dev], netns=ns)
            netns.run(["ip", "link", "set", dev, "up"], netns=ns)
        # Every copy leaving xf0 arrives on xfpeer: the jump counts them all, the chain of
        # non-terminating rules counts them per mark.
        restore = "\n".join(
            [
                "*mangle",
                ":FCCOUNT - [0:0]",
                "-A PREROUTING -i xfpeer -j FCCOUNT",
                # A sink, as the real XFRM interface is: copies must not reach the local stack.
                "-A PREROUTING -i xfpeer -j DROP",
                *[f"-A FCCOUNT -i xfpeer -m mark --mark {m:#x}" for m in (*MARKS, 0)],
                "COMMIT",
                "",
            ]
        )
        netns.run(["iptables-restore"], netns=gw, input_text=restore)
        ifindex = {name: netns.ifindex(gw, name) for name in ("lan0", "xf0", "xfpeer")}
        datapath.load()
        datapath.write_config(
            DatapathConfig(
                xfrm_ifindex=ifindex["xf0"],
                lan_ifindex=ifindex["lan0"],
                lan_mac=bytes.fromhex("02fc00000001"),
                lan_broadcast=IPv4Address(BCAST),
                groups=(IPv4Address(GROUP), IPv4Address("224.0.0.252")),
            )
        )
        tc.attach(ifindex["lan0"], datapath.fds["lan"], "fc_lan_ingress", netns=gw)
        tc.attach(ifindex["xf0"], datapath.fds["tunnel"], "fc_tunnel_ingress", netns=gw)
        yield Gateway(gw, lan, datapath, ifindex)
    finally:
        datapath.remove()
        netns.delete(gw)
        netns.delete(lan)
        subprocess.run(["umount", str(pins)], check=False)


def _sas(gateway: Gateway) -> None:
    """slot 0: mark 0x11, multicast + the LAN broadcast, reinject
    slot 1: mark 0x12, multicast only, reinject
    slot 5: mark 0x13, multicast + broadcast, no reinject"""
    mc, bc = IPv4Network("224.0.0.0/4"), IPv4Network(f"{BCAST}/32")
    vip = IPv4Network("10.9.128.1/32")
    gateway.datapath.write_sa(0, SaEntry(0x11, 0x11, (vip, mc, bc), reinject=True))
    gateway.datapath.write_sa(1, SaEntry(0x12, 0x12, (mc,), reinject=True))
    gateway.datapath.write_sa(5, SaEntry(0x13, 0x13, (mc, bc), reinject=False))
    assert gateway.datapath.sync_targets()


def _fcrules(gateway: Gateway) -> dict[int, int]:
    out = netns.run(["iptables-save", "-c", "-t", "mangle"], netns=gateway.gw).stdout
    return {
        int(m[2], 16): int(m[1])
        for m in re.finditer(
            r"\[(\d+):\d+\] -A FCCOUNT -i xfpeer -m mark --mark (0x[0-9a-f]+)", out
        )
    }


def _total(gateway: Gateway) -> int:
    out = netns.run(["iptables-save", "-c", "-t", "mangle"], netns=gateway.gw).stdout
    m = re.search(r"\[(\d+):\d+\] -A PREROUTING -i xfpeer -j FCCOUNT", out)
    assert m, out
    return int(m[1])


def test_programs_attach_with_our_priority(gateway: Gateway) -> None:
    assert tc.bpf_filters(gateway.ifindex["lan0"], netns=gateway.gw) == [
        (tc.DEFAULT_PRIO, "fc_lan_ingress")
    ]
    assert tc.bpf_filters(gateway.ifindex["xf0"], netns=gateway.gw) == [
        (tc.DEFAULT_PRIO, "fc_tunnel_ingress")
    ]


def test_lan_multicast_and_broadcast_one_copy_per_target_sa(gateway: Gateway) -> None:
    _sas(gateway)
    local = traffic.Receiver(gateway.gw, PORT, [GROUP], iface="lan0")
    traffic.send(gateway.lan, GROUP, PORT, "mc", 10, iface="eth0", pad=PAD)
    traffic.send(gateway.lan, BCAST, PORT, "bc", 7, pad=PAD)
    traffic.send(gateway.lan, OTHER_GROUP, PORT, "other", 5, iface="eth0", pad=PAD)
    traffic.send(gateway.lan, "10.9.0.1", PORT, "unicast", 5, pad=PAD)
    traffic.send(gateway.lan, BCAST, 67, "dhcp", 3, pad=PAD)
    time.sleep(0.5)
    got_local = local.stop()

    # Multicast: all three SAs; broadcast: the two that negotiated it; nothing else.
    assert _fcrules(gateway) == {0x11: 10 + 7, 0x12: 10, 0x13: 10 + 7, 0: 0}
    assert _total(gateway) == 10 + 7 + 10 + 10 + 7
    # The original went on untouched to the gateway's own stack.
    assert got_local.exactly_once("mc", 10) and got_local.exactly_once("bc", 7)

    ip_len = 20 + 8 + len("mc 0") + PAD
    counters = gateway.datapath.counters([0, 1, 5])
    assert counters[0].by_direction[Direction.LAN_TO_SA].packets == 17
    assert counters[1].by_direction[Direction.LAN_TO_SA].packets == 10
    assert counters[1].by_direction[Direction.LAN_TO_SA].bytes == 10 * ip_len
    assert counters[5].by_direction[Direction.SA_TO_LAN].packets == 0
    assert all(v == 0 for v in gateway.datapath.drops().values())


def test_client_multicast_to_lan_and_reinjecting_sas_never_the_origin(gateway: Gateway) -> None:
    _sas(gateway)
    lan_rx = traffic.Receiver(gateway.lan, PORT, [GROUP])
    # "Decrypted from the SA with mark 0x11": sent from xfpeer into xf0 with that mark.
    traffic.send(gateway.gw, GROUP, PORT, "c1", 12, iface="xfpeer", mark=0x11, pad=PAD)
    time.sleep(0.5)
    got = lan_rx.stop()
    assert got.exactly_once("c1", 12)  # the LAN copy, with a multicast MAC the LAN accepts
    # Only slot 1 reinjects and is not the origin; slot 5 takes no reinjected traffic.
    assert _fcrules(gateway) == {0x11: 0, 0x12: 12, 0x13: 0, 0: 0}
    counters = gateway.datapath.counters([0, 1, 5])
    assert counters[0].by_direction[Direction.SA_TO_LAN].packets == 12
    assert counters[1].by_direction[Direction.SA_TO_SA].packets == 12
    assert counters[5].by_direction[Direction.SA_TO_SA].packets == 0


def test_unknown_origin_is_counted_and_not_forwarded(gateway: Gateway) -> None:
    _sas(gateway)
    lan_rx = traffic.Receiver(gateway.lan, PORT, [GROUP])
    traffic.send(gateway.gw, GROUP, PORT, "who", 4, iface="xfpeer", mark=0x99, pad=PAD)
    time.sleep(0.5)
    assert lan_rx.stop().total("who") == 0
    assert _fcrules(gateway) == {0x11: 0, 0x12: 0, 0x13: 0, 0: 0}
    assert gateway.datapath.drops()[DropReason.UNKNOWN_ORIGIN] == 4


def test_cleared_slot_gets_nothing_and_a_reused_slot_starts_from_zero(gateway: Gateway) -> None:
    _sas(gateway)
    traffic.send(gateway.lan, GROUP, PORT, "a", 3, iface="eth0", pad=PAD)
    gateway.datapath.write_sa(1, None)
    assert gateway.datapath.sync_targets()
    traffic.send(gateway.lan, GROUP, PORT, "b", 4, iface="eth0", pad=PAD)
    time.sleep(0.3)
    assert _fcrules(gateway)[0x12] == 3
    gateway.datapath.write_sa(1, SaEntry(0x21, 0x21, (IPv4Network("224.0.0.0/4"),)))
    assert gateway.datapath.sync_targets()
    assert gateway.datapath.counters([1])[1].by_direction[Direction.LAN_TO_SA].packets == 0
