"""`status` at scale: 4,096 SAs sorted, filtered, cut to the terminal. Pure rendering."""

from __future__ import annotations

import pytest

from forecast import status

pytestmark = pytest.mark.unit

N = 4096


def _sa(i: int) -> dict[str, object]:
    return {
        "slot": i,
        "ike": "rw" if i % 2 else "rw-eap",
        "child": "rw",
        "unique_id": 10_000 + i,
        "remote_id": f"client{i:04d}@roadwarriors.example.com",
        "virtual_ips": [f"10.{100 + i // 250}.{i % 250}.1"],
        "mark_in": 0x100 + i,
        "mark_out": 0x100 + i,
        "spi_in": f"{0xC0000000 + i:08x}",
        "spi_out": f"{0xD0000000 + i:08x}",
        "counters": {
            "lan_to_sa": {"packets": (i * 7919) % 10_007, "bytes": 100 * i},
            "sa_to_lan": {"packets": i % 13, "bytes": 0},
            "sa_to_sa": {"packets": 0, "bytes": 0},
        },
    }


@pytest.fixture(scope="module")
def snap() -> status.Snapshot:
    sas = [_sa(i) for i in range(N)]
    totals = {
        k: {"packets": sum(sa["counters"][k]["packets"] for sa in sas), "bytes": 0}  # type: ignore[index]
        for k in ("lan_to_sa", "sa_to_lan", "sa_to_sa")
    }
    return status.Snapshot(
        {
            "schema": 1,
            "daemon": {"running": True, "pid": 1, "vici_connected": True, "sync_errors": 0},
            "sas": sas,
            "totals": totals,
            "drops": {"clone_to_sa": 0},
            "ignored": {str(i): "no mark" for i in range(9)},
        }
    )


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_every_line_fits_the_terminal(snap: status.Snapshot, width: int) -> None:
    text = status.render_table(snap, view=status.View(width=width))  # not a watch: every row
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines)
    assert len(lines) == 1 + N + 1 + 2 + 6  # header, rows, totals, drops+daemon, ignored (5+1)
    header = lines[0]
    assert "ID" in header and "LAN>SA" in header  # never dropped
    assert ("SPI IN/OUT" in header) == (width >= 150)


def test_sort_top_and_match(snap: status.Snapshot) -> None:
    busiest = status.select(snap.sas, status.View(sort="lan_to_sa", top=3))
    counts = [sa["counters"]["lan_to_sa"]["packets"] for sa in busiest]
    assert (
        counts
        == sorted((s["counters"]["lan_to_sa"]["packets"] for s in snap.sas), reverse=True)[:3]
    )
    assert [sa["unique_id"] for sa in status.select(snap.sas, status.View(match="10042"))] == [
        10042
    ]
    by_vip = status.select(snap.sas, status.View(match="10.101.7."))
    assert [sa["virtual_ips"][0] for sa in by_vip] == ["10.101.7.1"]
    eap = status.select(snap.sas, status.View(match="RW-EAP/", sort="id", top=2))
    assert [sa["unique_id"] for sa in eap] == [10000, 10002]
    with pytest.raises(ValueError, match="--sort"):
        status.select(snap.sas, status.View(sort="nonsense"))


def test_watch_height_keeps_header_totals_and_footer(snap: status.Snapshot) -> None:
    text = status.render_table(snap, rates={}, view=status.View(width=100, height=30))
    lines = text.splitlines()
    assert len(lines) <= 30
    assert lines[0].lstrip().startswith("SLOT") or "ID" in lines[0]
    assert f"{N - (30 - 3 - 8)} of {N} SAs not shown (--match, --sort, --top N)" in lines
    assert lines[-1].startswith("... and 4 more ignored SAs")


def test_drops_per_sa_and_who_is_over_its_rate() -> None:
    def with_drops(i: int, storm: int, group: int) -> dict[str, object]:
        sa = _sa(i)
        sa["drops"] = {"storm": storm, "group_to_lan": group, "group_to_sas": 0, "clone": 0}
        return sa

    sas = [
        with_drops(i, storm, group)
        for i, (storm, group) in enumerate([(0, 0), (5, 2), (900, 0), (0, 7), (40, 0), (3, 0)])
    ]
    doc = {
        "daemon": {"running": True, "pid": 1, "vici_connected": True, "sync_errors": 0},
        "sas": sas,
        "totals": {k: {"packets": 0, "bytes": 0} for k in ("lan_to_sa", "sa_to_lan", "sa_to_sa")},
        "drops": {"storm_sa": 948, "group_to_lan": 9},
        "ignored": {},
    }
    out = status.render_table(status.Snapshot(doc), view=status.View(width=220, sort="slot"))
    lines = out.splitlines()
    header = lines[0].split()
    assert header[-1] == "DROPS"
    assert [ln.split()[-1] for ln in lines[1:7]] == ["0", "7", "900", "7", "40", "3"]
    assert lines[7].split()[-1] == "957"  # the totals row
    assert "drops: storm_sa 948, group_to_lan 9" in out
    # The three busiest floods, busiest first, and how many more.
    assert (
        "over their rate: #10002 client0002@roadwarriors.example.com 900, "
        "#10004 client0004@roadwarriors.example.com 40, "
        "#10001 client0001@roadwarriors.example.com 5 and 1 more"
    ) in out


def test_footer_says_where_the_mark_rules_are() -> None:
    daemon: dict[str, object] = {
        "running": True,
        "pid": 7,
        "vici_connected": True,
        "sync_errors": 0,
    }
    doc = {
        "daemon": daemon,
        "sas": [_sa(0)],
        "totals": {k: {"packets": 0, "bytes": 0} for k in ("lan_to_sa", "sa_to_lan", "sa_to_sa")},
        "drops": {},
        "ignored": {},
    }
    before = status.render_table(status.Snapshot(doc), view=status.View(width=200))
    assert "daemon pid 7, VICI connected, sync errors 0" in before.splitlines()
    daemon["netfilter"] = "nftables, table inet forecast_bpf"
    out = status.render_table(status.Snapshot(doc), view=status.View(width=200))
    assert (
        "daemon pid 7, VICI connected, sync errors 0, "
        "MARK rules in nftables, table inet forecast_bpf"
    ) in out.splitlines()


def test_footer_gives_the_copies_by_family() -> None:
    def counts(lan: int, up: int, other: int) -> dict[str, dict[str, int]]:
        return {
            "lan_to_sa": {"packets": lan, "bytes": 0},
            "sa_to_lan": {"packets": up, "bytes": 0},
            "sa_to_sa": {"packets": other, "bytes": 0},
        }

    doc = {
        "daemon": {"running": True, "pid": 7, "vici_connected": True, "sync_errors": 0},
        "sas": [_sa(0)],
        "totals": counts(0, 0, 0),
        "families": {"ipv4": counts(1200, 3, 0), "ipv6": counts(40, 20, 20)},
        "drops": {},
        "ignored": {},
    }
    out = status.render_table(status.Snapshot(doc), view=status.View(width=200)).splitlines()
    assert (
        "copies by family: IPv4 LAN>SA 1.2K SA>LAN 3 SA>SA 0 | IPv6 LAN>SA 40 SA>LAN 20 SA>SA 20"
    ) in out
    del doc["families"]  # a document without it (made by an older daemon's state): no line
    out = status.render_table(status.Snapshot(doc), view=status.View(width=200)).splitlines()
    assert not any(line.startswith("copies by family") for line in out)
