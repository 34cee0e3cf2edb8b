"""A client that moves (MOBIKE, a new NAT mapping): charon's ike-update, recorded from charon
5.9.8 by scripts/record_vici.py moves, moves the children's endpoints, and the inbound MARK rule
with them."""

from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from forecast import config, desired
from forecast.sa import PayloadError, SaTable
from tests.unit.conftest import load_events, load_list_sas

CFG = config.parse({"xfrm": {"if_id": 42}})
BCAST = IPv4Address("10.1.255.255")
OLD, NEW = IPv4Address("192.168.0.101"), IPv4Address("192.168.0.201")


def _recorded(fixtures_dir: Path) -> dict[str, tuple[str, Any]]:
    events = load_events(fixtures_dir / "moves")
    assert [e for _n, e, _p in events][:4] == [
        "ike-update",  # IKE_AUTH moves the unnamed IKE_SA from port 500 to 4500
        "ike-updown",
        "child-updown",
        "ike-update",  # the MOBIKE move
    ]
    return {name[:3]: (event, payload) for name, event, payload in events}


def _inbound(child_list: list[Any]) -> list[desired.MarkRule]:
    d = desired.compute(child_list, CFG, BCAST, {})
    return [r for r in d.rules if r.match.src is not None]


def test_a_move_changes_the_endpoints_and_the_inbound_rule(fixtures_dir: Path) -> None:
    rec = _recorded(fixtures_dir)
    table = SaTable()
    for key in ("001", "002", "003"):
        table.apply(*rec[key], 1.0)
    (child,) = table.active()
    assert (child.remote_host, child.remote_port, child.encap) == (OLD, 4500, True)
    (before,) = _inbound(table.active())

    (change,) = table.apply(*rec["004"], 2.0)
    assert change.kind == "moved" and change.old == child
    (moved,) = table.active()
    assert (moved.remote_host, moved.remote_port, moved.local_port) == (NEW, 4500, 4500)
    assert moved.encap  # nat-any: UDP-encapsulated
    assert (moved.unique_id, moved.spi_in, moved.mark_in) == (
        child.unique_id,
        child.spi_in,
        child.mark_in,
    )
    assert change.line() == (
        f"SA moved: {moved.label}, 192.168.0.101:4500 (UDP-encapsulated) -> "
        "192.168.0.201:4500 (UDP-encapsulated)"
    )
    (after,) = _inbound(table.active())
    assert before.match.src == IPv4Network("192.168.0.101/32")
    assert after.match.src == IPv4Network("192.168.0.201/32")
    assert (after.match.proto, after.match.sport, after.match.dport) == ("udp", 4500, 4500)
    assert after.mark == before.mark == child.mark_in
    # The same event again (a snapshot raced it) changes nothing.
    assert table.apply(*rec["004"], 3.0) == []


def test_an_update_before_the_ike_sa_has_children_changes_nothing(fixtures_dir: Path) -> None:
    rec = _recorded(fixtures_dir)
    table = SaTable()
    assert table.apply(*rec["001"], 1.0) == []
    assert len(table) == 0


def test_a_new_nat_mapping_moves_the_port(fixtures_dir: Path) -> None:
    """The same event with another outer port (what a NAT router's new mapping gives)."""
    rec = _recorded(fixtures_dir)
    table = SaTable()
    table.apply(*rec["003"], 1.0)
    event, payload = rec["004"]
    payload = copy.deepcopy(payload)
    payload["remote-host"], payload["remote-port"] = str(OLD).encode(), b"31337"
    (change,) = table.apply(event, payload, 2.0)
    (rule,) = _inbound(table.active())
    assert (rule.match.src, rule.match.sport) == (IPv4Network("192.168.0.101/32"), 31337)
    assert change.kind == "moved"


def test_a_snapshot_taken_after_a_missed_update_reports_the_move(fixtures_dir: Path) -> None:
    """The recorded snapshot after the move holds the rekeyed child (libipsec cannot update an
    SA's addresses, so charon rekeys it): a removal and an addition. Seen with the child it
    moved (its own unique id), the same snapshot is a move."""
    rec = _recorded(fixtures_dir)
    table = SaTable()
    table.apply(*rec["003"], 1.0)
    (held,) = table.active()
    snapshot = load_list_sas(fixtures_dir / "list-sas/gw-after-move.json")
    changes = SaTable().load_snapshot(copy.deepcopy(snapshot))
    assert [(c.kind, c.child.remote_host) for c in changes] == [("added", NEW)]
    assert [c.kind for c in copy.deepcopy(table).load_snapshot(snapshot)] == ["removed", "added"]

    children = snapshot[0]["rw"]["child-sas"]
    del children["rw-1"]  # the old child, DELETED
    children["rw-2"]["uniqueid"] = str(held.unique_id).encode()
    (change,) = table.load_snapshot(snapshot)
    assert change.kind == "moved" and change.old == held
    assert {c.remote_host for c in table.active()} == {NEW}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.pop("remote-host"), "ike-update: missing 'local-host' or 'remote-host'"),
        (lambda p: p.__setitem__("remote-port", b"70000"), "'remote-port' 70000 is not a port"),
        (lambda p: p.__setitem__("local-port", b"x"), "'local-port' is not a number"),
        (
            lambda p: p["rw"].pop("uniqueid"),
            "ike-update IKE_SA rw: missing or non-scalar 'uniqueid'",
        ),
    ],
)
def test_malformed_updates_are_named(fixtures_dir: Path, mutate: Any, message: str) -> None:
    rec = _recorded(fixtures_dir)
    table = SaTable()
    table.apply(*rec["003"], 1.0)
    held = table.active()
    event, payload = rec["004"]
    payload = copy.deepcopy(payload)
    mutate(payload)
    with pytest.raises(PayloadError, match=message):
        table.apply(event, payload, 2.0)
    assert table.active() == held  # nothing half-applied
