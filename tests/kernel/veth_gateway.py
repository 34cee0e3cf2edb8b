"""The real TC programs on this kernel, with veth stand-ins for the XFRM interface: a fixture
shared by the data path, guard and classifier tests.

    L: eth0 10.9.0.2 ── G: lan0 10.9.0.1/16   (LAN program on lan0 ingress)
                        G: xf0 ── xfpeer       (tunnel program on xf0 ingress; copies for SAs
                                                leave xf0 and are counted, per mark, by
                                                iptables rules on xfpeer in G)

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
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from forecast import tc
from forecast.datapath import Datapath, DatapathConfig, SaEntry
from forecast.lab import netns

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
        # No storm guard and any group from clients (the plugin's behaviour): the tests that
        # want them set them.
        config = DatapathConfig(
            xfrm_ifindex=ifindex["xf0"],
            lan_ifindex=ifindex["lan0"],
            lan_mac=bytes.fromhex("02fc00000001"),
            lan_broadcast=IPv4Address(BCAST),
            groups=(IPv4Address(GROUP), IPv4Address("224.0.0.252")),
        )
        datapath.write_config(config)
        tc.attach(ifindex["lan0"], datapath.fds["lan"], "fc_lan_ingress", netns=gw)
        tc.attach(ifindex["xf0"], datapath.fds["tunnel"], "fc_tunnel_ingress", netns=gw)
        yield Gateway(gw, lan, datapath, ifindex, config)


def add_sas(gateway: Gateway) -> None:
    """slot 0: mark 0x11, multicast + the LAN broadcast, reinject
    slot 1: mark 0x12, multicast only, reinject
    slot 5: mark 0x13, multicast + broadcast, no reinject"""
    mc, bc = IPv4Network("224.0.0.0/4"), IPv4Network(f"{BCAST}/32")
    vip = IPv4Network("10.9.128.1/32")
    gateway.datapath.write_sa(0, SaEntry(0x11, 0x11, (vip, mc, bc), reinject=True))
    gateway.datapath.write_sa(1, SaEntry(0x12, 0x12, (mc,), reinject=True))
    gateway.datapath.write_sa(5, SaEntry(0x13, 0x13, (mc, bc), reinject=False))
    assert gateway.datapath.sync_targets()


def fcrules(gateway: Gateway) -> dict[int, int]:
    out = netns.run(["iptables-save", "-c", "-t", "mangle"], netns=gateway.gw).stdout
    return {
        int(m[2], 16): int(m[1])
        for m in re.finditer(
            r"\[(\d+):\d+\] -A FCCOUNT -i xfpeer -m mark --mark (0x[0-9a-f]+)", out
        )
    }


def total_copies(gateway: Gateway) -> int:
    out = netns.run(["iptables-save", "-c", "-t", "mangle"], netns=gateway.gw).stdout
    m = re.search(r"\[(\d+):\d+\] -A PREROUTING -i xfpeer -j FCCOUNT", out)
    assert m, out
    return int(m[1])
