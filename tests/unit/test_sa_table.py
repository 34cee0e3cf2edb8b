"""The SA table, driven by what charon 5.9.8 really sent (gateway side, INDEX.md steps)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from forecast.sa import REKEY_GRACE_S, PayloadError, SaTable
from tests.unit.conftest import load_events, load_list_sas


def _replay(fixtures_dir: Path, upto: str) -> tuple[SaTable, list[str]]:
    table, lines = SaTable(), []
    now = 1000.0
    for name, event, payload in load_events(fixtures_dir / "gw"):
        now += 1
        lines += [c.line() for c in table.apply(event, payload, now)]
        if name.startswith(upto):
            break
    return table, lines


def test_two_clients_connect(fixtures_dir: Path) -> None:
    table, lines = _replay(fixtures_dir, "004")
    kids = table.active()
    assert [(c.unique_id, c.mark_in, c.remote_id) for c in kids] == [
        (2, 2, "c1@probe"),
        (3, 3, "c2@probe"),
    ]
    c1 = kids[0]
    assert c1.remote_vips == (IPv4Address("10.1.0.129"),)
    assert IPv4Network("10.1.255.255/32") in c1.remote_ts
    assert c1.encap and c1.remote_port == 4500 and c1.spi_in == 0x3F3F4BBD
    assert c1.marked and c1.if_id_in == 0
    assert lines == [
        "SA added: rw/rw #2 (c1@probe, mark 0x2, spi-in 3f3f4bbd)",
        "SA added: rw/rw #3 (c2@probe, mark 0x3, spi-in 50fd2ae0)",
    ]


def test_child_rekey_keeps_the_old_sa_for_its_grace_period(fixtures_dir: Path) -> None:
    table, lines = _replay(fixtures_dir, "005")
    assert [c.unique_id for c in table.active()] == [3, 4]
    old = table.children[2]
    assert old.retire_at is not None and old.spi_in == 0x3F3F4BBD
    assert table.children[4].mark_in == 2  # same mark, new SPI
    assert lines[-1].startswith(
        "SA rekeyed: rw/rw #4 (c1@probe, mark 0x2, spi-in ac640a60), was #2"
    )
    retired = table.expire(old.retire_at - 0.1)
    assert retired == []
    assert [c.kind for c in table.expire(old.retire_at + REKEY_GRACE_S)] == ["retired"]
    assert 2 not in table.children


def test_ike_rekey_moves_children_to_the_new_ike_sa(fixtures_dir: Path) -> None:
    table, _ = _replay(fixtures_dir, "008")
    by_remote = {c.remote_id: c for c in table.active()}
    assert by_remote["c1@probe"].ike_id == 4
    assert by_remote["c2@probe"].ike_id == 5


def test_reauth_gives_a_new_mark_and_disconnects_empty_the_table(fixtures_dir: Path) -> None:
    table, lines = _replay(fixtures_dir, "012")
    c1 = [c for c in table.active() if c.remote_id == "c1@probe"]
    assert len(c1) == 1 and c1[0].mark_in == 4 and c1[0].unique_id == 6
    assert any(line.startswith("SA removed: rw/rw #4") for line in lines)
    table, _ = _replay(fixtures_dir, "016")
    assert table.active() == []


def test_child_only_delete_and_recreate(fixtures_dir: Path) -> None:
    table, _ = _replay(fixtures_dir, "019")
    assert table.active() == []  # DELETED child removed, IKE_SA still up
    table, _ = _replay(fixtures_dir, "020")
    assert [(c.unique_id, c.mark_in) for c in table.active()] == [(8, 6)]


def test_if_id_variant_and_failed_auth(fixtures_dir: Path) -> None:
    table, _ = _replay(fixtures_dir, "024")
    (child,) = table.active()
    assert (child.if_id_in, child.if_id_out, child.mark_in) == (1, 1, 7)
    table, lines = _replay(fixtures_dir, "027")
    assert table.active() == [] and len(table) == 0
    assert not any("c2@probe" in line and "added" in line for line in lines[-2:])


def test_snapshot_replaces_the_table(fixtures_dir: Path) -> None:
    table = SaTable()
    changes = table.load_snapshot(load_list_sas(fixtures_dir / "list-sas/gw-2clients-up.json"))
    assert sorted(c.child.remote_id for c in changes) == ["c1@probe", "c2@probe"]
    again = table.load_snapshot(load_list_sas(fixtures_dir / "list-sas/gw-2clients-up.json"))
    assert again == []
    gone = table.load_snapshot(load_list_sas(fixtures_dir / "list-sas/gw-after-disconnect.json"))
    # both clients gone in that snapshot: both removed (a subset test would pass on nothing)
    assert sorted((c.kind, c.child.remote_id) for c in gone) == [
        ("removed", "c1@probe"),
        ("removed", "c2@probe"),
    ]
    assert len(table.active()) == len(
        [
            1
            for m in load_list_sas(fixtures_dir / "list-sas/gw-after-disconnect.json")
            for ike in m.values()
            for _ in ike.get("child-sas", {}).values()
        ]
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.pop("spi-in"), "CHILD_SA rw/rw: missing 'spi-in'"),
        (lambda c: c.__setitem__("mark-in", b"zz"), "'mark-in' is not hexadecimal"),
        (lambda c: c.__setitem__("remote-ts", [b"10.1.0.300/32"]), "not an IP prefix"),
        (lambda c: c.__setitem__("remote-ts", [b"ff02::/16", b"fd00::g/128"]), "'fd00::g/128'"),
        (lambda c: c.__setitem__("uniqueid", b"two"), "'uniqueid' is not a number"),
    ],
)
def test_malformed_payloads_are_named(fixtures_dir: Path, mutate: object, message: str) -> None:
    _name, event, payload = load_events(fixtures_dir / "gw")[1]
    child = next(iter(payload["rw"]["child-sas"].values()))
    mutate(child)  # type: ignore[operator]
    table = SaTable()
    with pytest.raises(PayloadError, match=message):
        table.apply(event, payload, 0.0)
    assert len(table) == 0  # nothing half-applied


def test_ipv6_selectors_are_kept_beside_the_ipv4_ones(fixtures_dir: Path) -> None:
    """A dual-stack client's child: charon lists both families in one TS list."""
    _name, event, payload = load_events(fixtures_dir / "gw")[1]
    child = next(iter(payload["rw"]["child-sas"].values()))
    child["remote-ts"] = [*child["remote-ts"], b"fd00:2::1/128", b"ff02::/16"]
    child["local-ts"] = [*child["local-ts"], b"fe80::/10"]
    table = SaTable()
    (change,) = table.apply(event, payload, 0.0)
    remote = [str(ts) for ts in change.child.remote_ts]
    assert remote[-2:] == ["fd00:2::1/128", "ff02::/16"]
    assert any(ts.version == 4 for ts in change.child.remote_ts)
    assert str(change.child.local_ts[-1]) == "fe80::/10"
