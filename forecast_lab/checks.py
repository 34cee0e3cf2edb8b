"""Scenario checks on a running lab, driven only by its topology description.

Each check sends bounded, tagged traffic and returns a CheckResult that records what every host
counted, so a failure says who got what, not just "failed".
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from ipaddress import ip_address
from typing import Any

from forecast_lab import ipsec_state, traffic
from forecast_lab.topology import Host, Topology

SSDP_GROUP = "239.255.255.250"
SSDP_GROUP6 = "ff02::c"
MDNS_GROUP6 = "ff02::fb"
SSDP_PORT = 1900
DEFAULT_COUNT = 20
_STARTED = time.monotonic()


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)
    # Seconds since the scenario started: where a slow scenario spends its time.
    at_s: float = field(default_factory=lambda: round(time.monotonic() - _STARTED, 1))

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}  {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tag(label: str) -> str:
    return f"{label}-{secrets.token_hex(3)}"


def _groups_for(dst: str) -> list[str]:
    """Receivers join the destination when it is a group, so "nobody got it" means the
    forwarder held it back, not that nobody listened. An IPv6 destination: an IPv6 receiver."""
    addr = ip_address(dst)
    groups = [SSDP_GROUP if addr.version == 4 else SSDP_GROUP6]
    if addr.is_multicast and dst not in groups:
        groups.append(dst)
    return groups


def _receive_everywhere(
    hosts: list[Host], send: Any, tag: str, count: int, expect: dict[str, int], dst: str
) -> tuple[bool, dict[str, Any]]:
    """Start receivers on `hosts`, call send(), and compare per-host counts with `expect`
    (host → copies of every packet: 1 = exactly once, 0 = none at all)."""
    # Started together, then awaited: each is a Python start-up, slow under TCG.
    receivers = {
        h.name: traffic.Receiver(h.netns, SSDP_PORT, _groups_for(dst), wait=False) for h in hosts
    }
    for r in receivers.values():
        r.wait_ready()
    try:
        send()
    finally:
        time.sleep(0.5)  # in-flight copies (sub-millisecond here); receivers stop on SIGTERM
        got = {name: r.stop() for name, r in receivers.items()}
    detail: dict[str, Any] = {}
    ok = True
    for name, received in got.items():
        per_seq = received.for_tag(tag)
        want = expect.get(name, 0)
        host_ok = received.exactly_once(tag, count) if want == 1 else not per_seq
        ok &= host_ok
        detail[name] = {
            "received": sum(per_seq.values()),
            "distinct": len(per_seq),
            "expected": count * want,
            "ok": host_ok,
        }
    return ok, detail


def lan_to_clients(
    topo: Topology, dst: str, expect_clients: set[str], count: int = DEFAULT_COUNT
) -> CheckResult:
    """The LAN host sends to `dst`; every client in expect_clients must get each packet once,
    every other client none."""
    tag = _tag("lan")
    lan = topo.lan_host

    def send() -> None:
        traffic.send(lan.netns, dst, SSDP_PORT, tag, count, iface="eth0")

    ok, detail = _receive_everywhere(
        topo.clients, send, tag, count, dict.fromkeys(expect_clients, 1), dst
    )
    return CheckResult(
        f"LAN -> {dst} reaches {sorted(expect_clients) or 'no client'} once", ok, detail
    )


def client_to_others(
    topo: Topology,
    origin: str,
    dst: str,
    expect_clients: set[str],
    expect_lan: bool,
    count: int = DEFAULT_COUNT,
) -> CheckResult:
    """A client sends to `dst` from its virtual IP; the listed clients and (if expected) the LAN
    host get each packet once; the origin never gets an echo."""
    tag = _tag(origin)
    src = topo.host(origin)

    vip = src.virtual_ip6 if ip_address(dst).version == 6 else src.virtual_ip

    def send() -> None:
        traffic.send(src.netns, dst, SSDP_PORT, tag, count, src=vip, iface="eth0")

    expect = dict.fromkeys(expect_clients, 1) | ({"lan": 1} if expect_lan else {})
    ok, detail = _receive_everywhere([*topo.clients, topo.lan_host], send, tag, count, expect, dst)
    who = sorted(expect_clients) + (["lan"] if expect_lan else [])
    return CheckResult(f"{origin} -> {dst} reaches {who} once, no echo", ok, detail)


def unicast(topo: Topology, count: int = 3, version: int = 4) -> CheckResult:
    """Ping VIP <-> LAN host for every client; the gateway's ESP counters of each SA must rise."""
    gw_socket = topo.gateway.vici_socket
    before = ipsec_state.esp_packets(gw_socket)
    detail: dict[str, Any] = {}
    ok = True
    lan_addr = topo.lan_host.lan_addr6 if version == 6 else topo.lan_host.lan_addr
    for c in topo.clients:
        vip = c.virtual_ip6 if version == 6 else c.virtual_ip
        to_lan = traffic.ping(c.netns, lan_addr, count, src=vip)
        from_lan = traffic.ping(topo.lan_host.netns, vip, count)
        detail[c.name] = {"vip": vip, "ping_to_lan": to_lan, "ping_from_lan": from_lan}
        ok &= to_lan and from_lan
    after = ipsec_state.esp_packets(gw_socket)
    for uid, (pin, pout) in after.items():
        b_in, b_out = before.get(uid, (0, 0))
        rose = pin - b_in >= 2 * count and pout - b_out >= 2 * count
        detail[f"sa{uid}"] = {"esp_in": pin - b_in, "esp_out": pout - b_out, "rose": rose}
        ok &= rose
    ok &= len(after) == len(topo.clients)
    family = "" if version == 4 else " (IPv6)"
    return CheckResult(
        f"unicast VIP <-> LAN over ESP{family}, gateway SA counters rise", ok, detail
    )


def gateway_clients(topo: Topology) -> tuple[set[str], dict[str, set[str]]]:
    """The gateway's own view of its CHILD_SAs: (clients that negotiated the LAN broadcast,
    CHILD_SA config name → its clients)."""
    bcast: set[str] = set()
    by_child: dict[str, set[str]] = {}
    for c in ipsec_state.child_sas(topo.gateway.vici_socket):
        client = c["remote-id"].split("@")[0]
        if f"{topo.lan_broadcast}/32" in c["remote-ts"].split():
            bcast.add(client)
        by_child.setdefault(c["name"], set()).add(client)
    return bcast, by_child


def counters_after_scenario(
    doc: dict[str, Any], count: int, bcast_clients: set[str], origin: str, others: set[str]
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(expected, counted) packets per client and direction from `status --json` after the
    daemon scenarios' checks: `count` of the LAN's multicast to every client and of its
    broadcast to `bcast_clients`, `origin`'s multicast to the LAN and to `others`."""
    want, got = {}, {}
    for sa in doc["sas"]:
        name = sa["remote_id"].split("@")[0]
        want[name] = {
            "lan_to_sa": count + (count if name in bcast_clients else 0),
            "sa_to_lan": count if name == origin else 0,
            "sa_to_sa": count if name in others else 0,
        }
        got[name] = {k: int(v["packets"]) for k, v in sa["counters"].items()}
    return want, got


def reference_scenario(topo: Topology) -> list[CheckResult]:
    """What strongSwan's forecast plugin does (forecast-plugin.md), as checks."""
    names = {c.name for c in topo.clients}
    results = [
        unicast(topo),
        lan_to_clients(topo, SSDP_GROUP, names),
        lan_to_clients(topo, topo.lan_broadcast, names),
    ]
    first = topo.clients[0].name
    results.append(client_to_others(topo, first, SSDP_GROUP, names - {first}, expect_lan=True))
    return results
