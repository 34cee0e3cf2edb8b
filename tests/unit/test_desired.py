"""Desired state from recorded SAs; MARK rules held against the plugin's own rule dump."""

from __future__ import annotations

import re
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path

from forecast import config, desired, layout, netfilter, rules_iptables, rules_nft
from forecast.sa import ChildSa, SaTable
from tests.conftest import FIXTURES
from tests.unit.conftest import load_events

CFG = config.parse({"reinject": ["rw"], "xfrm": {"if_id": 42}})
BCAST = IPv4Address("10.1.255.255")
RULES = FIXTURES / "forecast-plugin-rules"


def _children(fixtures_dir: Path, upto: str, if_id: int = 42) -> list[ChildSa]:
    table = SaTable()
    for name, event, payload in load_events(fixtures_dir / "gw"):
        table.apply(event, payload, 0.0)
        if name.startswith(upto):
            break
    return [replace(c, if_id_in=if_id, if_id_out=if_id) for c in table.all()]


def _plugin_rules(dump: str) -> set[tuple[str, tuple[str, ...], int]]:
    out = set()
    for line in (RULES / dump).read_text().splitlines():
        m = re.match(r"-A (PREROUTING|OUTPUT) (.*) -j MARK --set-xmark (0x[0-9a-f]+)/", line)
        if m:
            out.add((m[1], tuple(m[2].split()), int(m[3], 16)))
    return out


def _ours(d: desired.Desired) -> set[tuple[str, tuple[str, ...], int]]:
    return {(r.chain, tuple(rules_iptables.render_match(r.match).split()), r.mark) for r in d.rules}


def test_rules_equal_the_plugins_for_two_clients(fixtures_dir: Path) -> None:
    d = desired.compute(_children(fixtures_dir, "004"), CFG, BCAST, {})
    assert _ours(d) == _plugin_rules("forecast-mangle-2clients-up.iptables-legacy-save.txt")
    assert sorted(map(str, d.routes)) == ["10.1.0.129/32", "10.1.0.130/32"]


def test_rules_after_rekeys_equal_the_plugins(fixtures_dir: Path) -> None:
    children = _children(fixtures_dir, "008")
    d = desired.compute(children, CFG, BCAST, {})
    assert _ours(d) == _plugin_rules("forecast-mangle-after-rekeys.iptables-legacy-save.txt")


def test_esp_rekey_keeps_both_spis_until_the_old_one_retires(fixtures_dir: Path) -> None:
    kids = [replace(c, encap=False) for c in _children(fixtures_dir, "005")]
    d = desired.compute(kids, CFG, BCAST, {})
    spis = sorted(r.match.spi or 0 for r in d.rules if r.match.proto == "esp" and r.mark == 2)
    assert spis == sorted([0x3F3F4BBD, 0xAC640A60])
    assert len(d.slots) == 2  # one slot per mark, not per child
    settled = desired.compute([c for c in kids if c.retire_at is None], CFG, BCAST, {})
    assert [r.match.spi for r in settled.rules if r.match.proto == "esp" and r.mark == 2] == [
        0xAC640A60
    ]


def test_data_path_entries(fixtures_dir: Path) -> None:
    d = desired.compute(_children(fixtures_dir, "004"), CFG, BCAST, {})
    entries = {s.entry.mark_in: s.entry for s in d.slots.values()}
    assert set(entries) == {2, 3}
    assert entries[2].selectors == (IPv4Network("10.1.255.255/32"), IPv4Network("224.0.0.0/4"))
    assert entries[2].reinject and entries[2].mark_out == 2
    no_reinject = desired.compute(_children(fixtures_dir, "004"), config.parse({}), BCAST, {})
    assert not any(s.entry.reinject for s in no_reinject.slots.values())


def test_children_without_marks_or_our_if_id_are_ignored_with_a_reason(fixtures_dir: Path) -> None:
    children = _children(fixtures_dir, "004", if_id=7)  # another XFRM interface's
    d = desired.compute(children, CFG, BCAST, {})
    assert not d.rules and not d.slots and not d.routes
    # every child ignored, each for its if_id (an empty dict would pass `all`)
    assert sorted(d.ignored) == sorted(c.unique_id for c in children) and children
    assert all("if_id in/out 7/7" in r and "= 42" in r for r in d.ignored.values())
    # mark-only children, when the operator turned the local output path off
    off = config.parse({"reinject": ["rw"], "mark_only_sas": "ignore"})
    mark_only = _children(fixtures_dir, "004", if_id=0)
    d = desired.compute(mark_only, off, BCAST, {})
    assert not d.rules and not d.slots and not d.routes and not d.local_out_marks
    assert sorted(d.ignored) == sorted(c.unique_id for c in mark_only) and mark_only
    assert all("mark_only_sas: local-out" in r for r in d.ignored.values())
    unmarked = [replace(c, mark_in=0, mark_out=0) for c in _children(fixtures_dir, "004")]
    d = desired.compute(unmarked, CFG, BCAST, {})
    assert sorted(d.ignored) == sorted(c.unique_id for c in unmarked) and unmarked
    assert all(r.startswith("no unique mark") for r in d.ignored.values())


def test_mark_only_children_take_the_local_output_path(fixtures_dir: Path) -> None:
    """The seed's configuration (marks, no if_id): served, with the plugin's MARK rules, a
    guard per SA, no route of ours (charon routes such children itself), IPv4 copies only."""
    children = _children(fixtures_dir, "004", if_id=0)
    d = desired.compute(children, CFG, BCAST, {})
    assert not d.ignored and not d.routes
    entries = {s.entry.mark_in: s.entry for s in d.slots.values()}
    assert set(entries) == {2, 3} and all(e.local_out for e in entries.values())
    assert entries[2].selectors == (IPv4Network("10.1.255.255/32"), IPv4Network("224.0.0.0/4"))
    assert d.local_out_marks == {2, 3}
    guards = [r for r in d.rules if r.action == "drop"]
    assert sorted((r.chain, r.mark) for r in guards) == [("POSTROUTING", 2), ("POSTROUTING", 3)]
    marking = [r for r in d.rules if r.action == "mark"]
    xfrm = desired.compute(_children(fixtures_dir, "004"), CFG, BCAST, {})
    assert marking == xfrm.rules and marking  # the same MARK rules either way
    assert not xfrm.local_out_marks and not any(s.entry.local_out for s in xfrm.slots.values())
    assert [desired.path_of(c, CFG) for c in children] == ["local-out"] * len(children)
    notes = desired.path_notes(children[0], CFG)
    assert notes and "if_id_in = if_id_out = 42" in notes[0]


def test_slots_are_stable_and_capacity_is_reported() -> None:
    slots, left = desired.assign_slots([5, 6, 7], {6: 9})
    assert slots == {6: 9, 5: 0, 7: 1} and not left
    marks = list(range(1, layout.FC_MAX_SAS + 3))
    slots, left = desired.assign_slots(marks, {})
    assert len(slots) == layout.FC_MAX_SAS and left == marks[-2:]


def test_a_full_table_reports_who_is_left_out(fixtures_dir: Path) -> None:
    child = _children(fixtures_dir, "002")[0]
    many = [
        replace(child, unique_id=i, mark_in=i, mark_out=i) for i in range(1, layout.FC_MAX_SAS + 3)
    ]
    d = desired.compute(many, CFG, BCAST, {})
    assert len(d.slots) == layout.FC_MAX_SAS
    assert d.left_out == [layout.FC_MAX_SAS + 1, layout.FC_MAX_SAS + 2] and not d.waiting
    assert len([w for w in d.warnings if "SA table full" in w]) == 2


def test_a_slot_being_cleared_is_not_given_away_in_the_same_step() -> None:
    # Mark 5 leaves slot 0, mark 8 arrives: it must not land in slot 0 while packets may
    # still walk a list that names slot 0 as mark 5's.
    slots, left = desired.assign_slots([6, 8], {6: 1}, busy={0, 1})
    assert slots == {6: 1, 8: 2} and not left
    # A full table whose only free slot is still being cleared: the mark waits, no warning.
    marks = list(range(1, layout.FC_MAX_SAS + 1))
    previous = {m: m - 1 for m in marks[:-1]}
    busy = set(range(layout.FC_MAX_SAS))
    slots, left = desired.assign_slots(marks, previous, busy)
    assert left == [marks[-1]]


def test_zero_prefix_and_multicast_selectors_never_get_unicast_rules(fixtures_dir: Path) -> None:
    child = _children(fixtures_dir, "002")[0]
    child = replace(
        child,
        remote_ts=(
            IPv4Network("0.0.0.0/0"),
            IPv4Network("239.0.0.0/8"),
            IPv4Network("255.255.255.255/32"),
        ),
    )
    d = desired.compute([child], CFG, BCAST, {})
    assert [r for r in d.rules if r.match.src is None and r.chain == "OUTPUT"] == []
    assert d.routes == []
    (slot,) = d.slots.values()
    assert IPv4Network("0.0.0.0/0") in slot.entry.selectors


def test_a_dual_stack_child_gets_ipv6_routes_rules_and_selectors(fixtures_dir: Path) -> None:
    child = _children(fixtures_dir, "002")[0]
    vip6, ll6 = IPv6Network("fd00:2::1/128"), IPv6Network("ff02::/16")
    child = replace(child, remote_ts=(*child.remote_ts, vip6, ll6, IPv6Network("::/0")))
    d = desired.compute([child], CFG, BCAST, {})
    assert vip6 in d.routes and ll6 not in d.routes  # multicast and ::/0 are never routed
    v6_rules = [r for r in d.rules if r.match.dst == vip6]
    assert sorted(r.chain for r in v6_rules) == ["OUTPUT", "PREROUTING"]
    assert all(r.mark == child.mark_out for r in v6_rules)
    assert not [r for r in d.rules if r.match.dst in (ll6, IPv6Network("::/0"))]
    (slot,) = d.slots.values()
    # both families' multicast selectors go to the data path; ::/0 holds ff00::/8 too
    assert ll6 in slot.entry.selectors and IPv6Network("::/0") in slot.entry.selectors
    assert vip6 not in slot.entry.selectors
    # each back end spells the IPv6 rule in its own IPv6 syntax and table
    (pre6,) = [r for r in v6_rules if r.chain == "PREROUTING"]
    assert rules_iptables.family_of(pre6) == 6
    assert rules_iptables.render_match(pre6.match) == "-d fd00:2::1/128"
    (match,) = rules_nft.render_match(pre6.match)
    assert match["match"]["left"]["payload"] == {"protocol": "ip6", "field": "daddr"}
    assert match["match"]["right"] == "fd00:2::1"


def test_more_than_four_selectors_of_one_family_are_cut_with_a_warning(fixtures_dir: Path) -> None:
    child = _children(fixtures_dir, "002")[0]
    many6 = tuple(IPv6Network(f"ff0{i}::/16") for i in range(1, 7))
    child = replace(child, remote_ts=(*child.remote_ts, *many6))
    d = desired.compute([child], CFG, BCAST, {})
    (slot,) = d.slots.values()
    assert [ts for ts in slot.entry.selectors if ts.version == 6] == list(many6[:4])
    assert any("6 IPv6 multicast/broadcast selectors" in w for w in d.warnings)
    # the IPv4 ones are untouched by the IPv6 cut
    assert [ts for ts in slot.entry.selectors if ts.version == 4]


def test_render_is_one_transaction_of_our_chains(fixtures_dir: Path) -> None:
    d = desired.compute(_children(fixtures_dir, "004"), CFG, BCAST, {})
    text = rules_iptables.render(d.rules)
    lines = text.splitlines()
    assert lines[:4] == [
        "*mangle",
        ":FORECAST-PRE - [0:0]",
        ":FORECAST-OUT - [0:0]",
        ":FORECAST-POST - [0:0]",
    ]
    assert lines[-1] == "COMMIT"
    assert all(line.startswith(("-A FORECAST-PRE ", "-A FORECAST-OUT ")) for line in lines[4:-1])
    assert (
        '-d 10.1.0.129/32 -m comment --comment "forecast-bpf rw/rw #2 c1@probe" -j MARK '
        "--set-xmark 0x2/0xffffffff" in text
    )


def test_guards_render_and_read_back_in_both_back_ends(fixtures_dir: Path) -> None:
    """A guard drops multicast/broadcast with its SA's mark that leaves without IPsec; the
    signature read back from each back end's listing is the one applied."""
    d = desired.compute(_children(fixtures_dir, "004", if_id=0), CFG, BCAST, {})
    guard = next(r for r in d.rules if r.action == "drop")
    line = rules_iptables.render_rule(guard)
    assert line == (
        f"-A FORECAST-POST -m mark --mark {guard.mark:#x} -m policy --dir out --pol none "
        "-m addrtype --dst-type BROADCAST,MULTICAST -m comment --comment "
        f'"{guard.comment}" -j DROP'
    )
    assert rules_iptables._SAVED_GUARD.match(line)
    obj = rules_nft._rule_object(guard)
    assert obj["chain"] == "postrouting" and obj["expr"][-1] == {"drop": None}
    listed = {
        **obj,
        "expr": [*obj["expr"][:3], {"counter": {"packets": 3, "bytes": 9}}, obj["expr"][4]],
    }
    assert rules_nft._signature_of(listed) == ("POSTROUTING", guard.comment, guard.mark)
    assert netfilter.signature(guard) == ("POSTROUTING", guard.comment, guard.mark)


def test_nft_batch_replaces_our_table_whole(fixtures_dir: Path) -> None:
    d = desired.compute(_children(fixtures_dir, "004"), CFG, BCAST, {})
    batch = rules_nft.render(d.rules)
    table = {"family": "inet", "name": "forecast_bpf"}
    assert batch[:3] == [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    chains = [item["add"]["chain"] for item in batch[3:6]]
    assert [(c["name"], c["type"], c["hook"], c["prio"]) for c in chains] == [
        ("prerouting", "filter", "prerouting", -151),
        ("output", "route", "output", -151),
        ("postrouting", "filter", "postrouting", -151),
    ]
    rules = [item["add"]["rule"] for item in batch[6:]]
    assert len(rules) == len(d.rules) > 0
    vip = next(r for r in rules if r["chain"] == "output")
    assert vip["comment"] == "forecast-bpf rw/rw #2 c1@probe"
    assert vip["expr"] == [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": "10.1.0.129",
            }
        },
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 2}},
    ]
    natt = [r for r in rules if any("udp" in str(e) for e in r["expr"])]
    assert len(natt) == 2  # both clients are NAT-T (libipsec): matched by their ports


def test_a_peer_with_two_sas_gets_copies_through_the_newest_only(fixtures_dir: Path) -> None:
    """Make-before-break reauthentication: a new IKE_SA and CHILD_SA (new mark) for the same
    identity and addresses while the old one still exists."""
    old = next(c for c in _children(fixtures_dir, "004") if c.remote_id == "c1@probe")
    new = replace(old, unique_id=old.unique_id + 10, mark_in=9, mark_out=9, spi_in=0x1234)
    other = next(c for c in _children(fixtures_dir, "004") if c.remote_id == "c2@probe")
    d = desired.compute([old, new, other], CFG, BCAST, {})
    by_mark = {st.entry.mark_in: st.entry for st in d.slots.values()}
    assert len(by_mark) == 3
    assert by_mark[9].copies and by_mark[other.mark_in].copies
    assert not by_mark[old.mark_in].copies  # still in the table: its traffic is forwarded
    # Once the old one is gone, the new one alone, with copies.
    after = desired.compute([new, other], CFG, BCAST, {})
    assert len(after.slots) == 2 and all(st.entry.copies for st in after.slots.values())
