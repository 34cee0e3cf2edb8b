"""The real TC programs on this kernel, with veth stand-ins for the XFRM interface: a fixture
shared by the data path, guard and classifier tests.

    L: eth0 10.9.0.2 ── G: lan0 10.9.0.1/16   (LAN program on lan0 ingress)
       fd09::2            fd09::1/64
                        G: xf0 ── xfpeer       (tunnel program on xf0 ingress; copies for SAs
                           fd08::1  fd08::2     leave xf0 and are counted, per mark, by
                                                iptables and ip6tables rules on xfpeer in G)

xf0 and xfpeer share a namespace, so skb->mark survives the veth crossing in both directions:
a packet sent from xfpeer with SO_MARK M reaches xf0 as "decrypted by the SA with mark M".
The counting is iptables', not ours: an independent witness of every copy and its mark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from forecast import tc
from forecast.datapath import Datapath, DatapathConfig, SaEntry
from forecast_lab import netns

GROUP = "239.255.255.250"
OTHER_GROUP = "224.0.0.251"  # not in the configured groups
GROUP6 = "ff02::fb"
OTHER_GROUP6 = "ff02::1:3"  # not in the configured groups
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
    config: DatapathConfig

    def configure(self, **changes: Any) -> None:
        """Rewrite the data path's configuration with these fields changed."""
        self.config = dataclasses.replace(self.config, **changes)
        self.datapath.write_config(self.config)


@contextlib.contextmanager
def stand_in_gateway(tmp_path: Path, gw: str, lan: str) -> Iterator[Datapath]:
    """Namespaces `gw` and `lan` joined lan0 ── eth0, the stand-in XFRM pair xf0 ── xfpeer in
    `gw`, and a data path (not loaded yet) pinned in a private bpffs. Everything goes at the end,
    whatever the test did (the pins with the unmount)."""
    pins = tmp_path / "bpffs"
    pins.mkdir()
    netns.create(gw)
    netns.create(lan)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(pins)], check=True)
    datapath = Datapath(pins / "forecast")
    try:
        netns.add_veth("lan0", gw, "eth0", lan)
        netns.add_veth("xf0", gw, "xfpeer", gw)
        yield datapath
    finally:
        datapath.remove()
        netns.delete(gw)
        netns.delete(lan)
        subprocess.run(["umount", str(pins)], check=False)


@pytest.fixture
def gateway(run_prefix: str, tmp_path: Path) -> Iterator[Gateway]:
    gw, lan = f"{run_prefix}-dg", f"{run_prefix}-dl"
    with stand_in_gateway(tmp_path, gw, lan) as datapath:
        for ns, dev, cidr in (
            (gw, "lan0", "10.9.0.1/16"),
            (lan, "eth0", "10.9.0.2/16"),
            (gw, "xf0", "10.8.0.1/24"),
            (gw, "xfpeer", "10.8.0.2/24"),
        ):
            netns.run(["ip", "addr", "add", cidr, "brd", "+", "dev", dev], netns=ns)
            netns.run(["ip", "link", "set", dev, "up"], netns=ns)
        for ns, dev, cidr in (
            (gw, "lan0", "fd09::1/64"),
            (lan, "eth0", "fd09::2/64"),
            (gw, "xf0", "fd08::1/64"),
            (gw, "xfpeer", "fd08::2/64"),
        ):
            netns.run(["ip", "-6", "addr", "add", cidr, "dev", dev, "nodad"], netns=ns)
        for ns in (gw, lan):
            # No ICMPv6 chatter of the namespaces' own (router solicitations, MLD reports, DAD):
            # from xfpeer it would reach the tunnel program as unmarked, unknown-origin traffic
            # at random moments, which the tests count exactly.
            netns.run(["ip6tables", "-A", "OUTPUT", "-p", "ipv6-icmp", "-j", "DROP"], netns=ns)
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
        netns.run(["ip6tables-restore"], netns=gw, input_text=restore)
        ifindex = {name: netns.ifindex(gw, name) for name in ("lan0", "xf0", "xfpeer")}
        datapath.load()
        # No storm guard and any group from clients (the plugin's behaviour): the tests that
        # want them set them.
        config = DatapathConfig(
            xfrm_ifindex=ifindex["xf0"],
            lan_ifindex=ifindex["lan0"],
            lan_mac=bytes.fromhex("02fc00000001"),
            lan_broadcast=IPv4Address(BCAST),
            groups=(IPv4Address(GROUP), IPv4Address("224.0.0.252"), IPv6Address(GROUP6)),
        )
        datapath.write_config(config)
        tc.attach(ifindex["lan0"], datapath.fds["lan"], "fc_lan_ingress", netns=gw)
        tc.attach(ifindex["xf0"], datapath.fds["tunnel"], "fc_tunnel_ingress", netns=gw)
        yield Gateway(gw, lan, datapath, ifindex, config)


def add_sas(gateway: Gateway) -> None:
    """slot 0: mark 0x11, multicast + the LAN broadcast + IPv6 link-local multicast, reinject
    slot 1: mark 0x12, multicast (both families), reinject
    slot 5: mark 0x13, IPv4 multicast + broadcast, no reinject"""
    mc, bc = IPv4Network("224.0.0.0/4"), IPv4Network(f"{BCAST}/32")
    ll6, mc6 = IPv6Network("ff02::/16"), IPv6Network("ff00::/8")
    vip = IPv4Network("10.9.128.1/32")
    gateway.datapath.write_sa(0, SaEntry(0x11, 0x11, (vip, mc, bc, ll6), reinject=True))
    gateway.datapath.write_sa(1, SaEntry(0x12, 0x12, (mc, mc6), reinject=True))
    gateway.datapath.write_sa(5, SaEntry(0x13, 0x13, (mc, bc), reinject=False))
    assert gateway.datapath.sync_targets()


def _saved(gateway: Gateway, families: tuple[int, ...]) -> list[str]:
    tools = {4: "iptables-save", 6: "ip6tables-save"}
    return [netns.run([tools[f], "-c", "-t", "mangle"], netns=gateway.gw).stdout for f in families]


def fcrules(gateway: Gateway, families: tuple[int, ...] = (4, 6)) -> dict[int, int]:
    """Copies that left the stand-in XFRM interface, per mark, in these address families."""
    out: dict[int, int] = {}
    for text in _saved(gateway, families):
        for m in re.finditer(
            r"\[(\d+):\d+\] -A FCCOUNT -i xfpeer -m mark --mark (0x[0-9a-f]+)", text
        ):
            out[int(m[2], 16)] = out.get(int(m[2], 16), 0) + int(m[1])
    return out


def total_copies(gateway: Gateway, families: tuple[int, ...] = (4, 6)) -> int:
    total = 0
    for text in _saved(gateway, families):
        m = re.search(r"\[(\d+):\d+\] -A PREROUTING -i xfpeer -j FCCOUNT", text)
        assert m, text
        total += int(m[1])
    return total
