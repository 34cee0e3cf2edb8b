"""A dual-stack client as charon 5.9.8 reports it (recorded by scripts/record_vici.py
dual-stack): an IPv4 and an IPv6 virtual IP, both families' selectors in one CHILD_SA. The SA
table keeps both; the desired state routes and marks the IPv6 virtual IP and forwards IPv6
multicast into the SA's IPv6 selector; a rekey keeps the slot."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from forecast import config, desired
from forecast.datapath import decode_sa, encode_sa
from forecast.sa import SaTable
from tests.unit.conftest import load_events, load_list_sas

CFG = config.parse({"xfrm": {"if_id": 42}, "reinject": ["rw"]})
BCAST = IPv4Address("10.1.255.255")
VIP4, VIP6 = IPv4Address("10.1.0.129"), IPv6Address("fd00:2::1")


def _table(fixtures_dir: Path) -> tuple[SaTable, list[str]]:
    table = SaTable()
    kinds = []
    for _name, event, payload in load_events(fixtures_dir / "dual-stack"):
        kinds += [c.kind for c in table.apply(event, payload, 0.0)]
    return table, kinds


def test_both_virtual_ips_and_both_families_selectors_are_kept(fixtures_dir: Path) -> None:
    table, kinds = _table(fixtures_dir)
    assert kinds == ["added", "rekeyed"]
    (child,) = table.active()
    assert child.remote_vips == (VIP4, VIP6)
    assert IPv6Network("fd00:2::1/128") in child.remote_ts
    assert IPv6Network("ff02::/16") in child.remote_ts
    assert IPv4Network("224.0.0.0/4") in child.remote_ts
    assert IPv6Network("fd00:1::/64") in child.local_ts


def test_the_ipv6_virtual_ip_is_routed_and_marked_and_ipv6_multicast_forwarded(
    fixtures_dir: Path,
) -> None:
    table, _kinds = _table(fixtures_dir)
    d = desired.compute(table.all(), CFG, BCAST, {})
    assert set(d.routes) == {IPv4Network(f"{VIP4}/32"), IPv6Network(f"{VIP6}/128")}
    (child,) = table.active()
    for net in (IPv4Network(f"{VIP4}/32"), IPv6Network(f"{VIP6}/128")):
        hooks = sorted(r.chain for r in d.rules if r.match.dst == net)
        assert hooks == ["OUTPUT", "PREROUTING"], net
    (slot,) = d.slots.values()
    # The rekeyed child's: the client proposed its own selectors, without the LAN broadcast
    # (a libipsec client does not name it; INDEX.md), which the first child had.
    assert slot.entry.selectors == (IPv4Network("224.0.0.0/4"), IPv6Network("ff02::/16"))
    assert slot.entry.mark_in == child.mark_in and slot.entry.reinject
    # what the kernel holds reads back the same
    back = decode_sa(encode_sa(slot.entry))
    assert back is not None and set(back.selectors) == set(slot.entry.selectors)


def test_the_snapshot_after_the_rekey_says_the_same(fixtures_dir: Path) -> None:
    events_table, _kinds = _table(fixtures_dir)
    snap = SaTable()
    snap.load_snapshot(load_list_sas(fixtures_dir / "list-sas/gw-dual-stack.json"))
    (a,), (b,) = events_table.active(), snap.active()
    assert (a.unique_id, a.remote_ts, a.remote_vips) == (b.unique_id, b.remote_ts, b.remote_vips)
