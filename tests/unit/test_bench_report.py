"""The benchmark report from a real quick run's records (tests/fixtures/bench, recorded by
`forecast-bpf lab bench --quick` on the 6.1 lab kernel)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from forecast.cli import build_parser
from forecast_lab import bench_report
from forecast_lab.pktgen import Flow, multicast_mac
from tests.conftest import FIXTURES

RECORDED = FIXTURES / "bench" / "quick-6.1.txt"


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    recs = bench_report.parse(RECORDED.read_text())
    assert recs, f"no BENCH records in {RECORDED}"
    return recs


def _steps(records: list[dict[str, Any]], forwarder: str, series: str) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r["kind"] == "step" and r["forwarder"] == forwarder and r["series"] == series
    ]


def test_parse_keeps_only_records() -> None:
    text = 'lab: booting\nBENCH {"kind": "meta", "forwarder": "plugin"}\nbench: step\n'
    assert bench_report.parse(text) == [{"kind": "meta", "forwarder": "plugin"}]


def test_rows_follow_the_steps(records: list[dict[str, Any]]) -> None:
    summ = bench_report.summary(records)
    assert {r["forwarder"] for r in summ["rows"]} == set(bench_report.FORWARDERS)
    for row in summ["rows"]:
        steps = _steps(records, row["forwarder"], "multicast")
        assert len(steps) == 3
        best = max(steps, key=lambda s: s["delivered_per_s"])
        assert row["copies_per_s"] == best["delivered_per_s"] > 0
        assert row["us_per_copy"] == best["us_per_copy"]["total"] > 0
        ok = [
            s["offered_pps"]
            for s in steps
            if s["loss"] <= 0.001 and s["drain_seconds"] <= 0.25 * s["send_seconds"]
        ]
        assert row["zero_loss_pps"] == (max(ok) if ok else None)
        esp = max(_steps(records, row["forwarder"], "esp"), key=lambda s: s["delivered_per_s"])
        assert row["per_copy_over_esp"] == pytest.approx(
            best["us_per_copy"]["total"] / esp["us_per_copy"]["total"]
        )


def test_ratios_are_each_path_over_its_base(records: list[dict[str, Any]]) -> None:
    summ = bench_report.summary(records)
    assert [(r["forwarder"], r["base"]) for r in summ["ratios"]] == list(bench_report.RATIOS)
    by = {r["forwarder"]: r for r in summ["rows"]}
    for ratio in summ["ratios"]:
        mine, base = by[ratio["forwarder"]], by[ratio["base"]]
        assert ratio["us_per_copy"] == pytest.approx(mine["us_per_copy"] / base["us_per_copy"])
        assert ratio["copies_per_s"] == pytest.approx(mine["copies_per_s"] / base["copies_per_s"])


def test_a_step_that_only_queued_its_copies_is_not_lossless() -> None:
    """The local output path's ring absorbs a burst: no copy lost, but delivered long after
    the step; such a rate is not sustained."""
    step = {"loss": 0.0, "send_seconds": 2.0, "drain_seconds": 4.8}
    assert not bench_report.lossless(step)
    assert bench_report.lossless({**step, "drain_seconds": 0.2})
    assert not bench_report.lossless({**step, "loss": 0.002, "drain_seconds": 0.0})
    del step["drain_seconds"]  # a forwarder with no queue
    assert bench_report.lossless(step)


def test_latency_quantiles(records: list[dict[str, Any]]) -> None:
    summ = bench_report.summary(records)
    for rec in (r for r in records if r["kind"] == "latency"):
        ms = [s["up_to_first_copy_ms"] for s in rec["samples"]]
        lat = summ["latency"][rec["forwarder"]]
        assert lat["connects"] == len(ms) == 5
        assert lat["p50_ms"] == pytest.approx(statistics.median(ms))
        assert min(ms) <= lat["p99_ms"] <= max(ms)
        sent = [s["up_to_first_esp_ms"] for s in rec["samples"]]
        assert lat["sent_p50_ms"] == pytest.approx(statistics.median(sent))
        assert lat["initiate_p50_ms"] == pytest.approx(
            statistics.median(s["initiate_to_first_copy_ms"] for s in rec["samples"])
        )


def test_a_series_that_always_loses_has_no_zero_loss_rate(records: list[dict[str, Any]]) -> None:
    lossy = [
        {**r, "loss": 0.5} if r["kind"] == "step" and r["forwarder"] == "plugin" else r
        for r in records
    ]
    summ = bench_report.summary(lossy)
    plugin = next(r for r in summ["rows"] if r["forwarder"] == "plugin")
    assert plugin["zero_loss_pps"] is None
    assert all(r["zero_loss_pps"] is None for r in summ["ratios"] if r["base"] == "plugin")
    table = bench_report.markdown(summ, [])
    assert "| 2 | 64 B | plugin | - |" in table


def test_nan_latency_is_left_out_of_quantiles() -> None:
    assert bench_report.quantile([math.nan, 10.0, 20.0], 0.5) == 15.0
    assert bench_report.quantile([math.nan], 0.5) is None


def test_report_files(records: list[dict[str, Any]], tmp_path: Path) -> None:
    report = bench_report.write(records, tmp_path)
    text = report.read_text()
    assert "![cpu-per-copy.png]" in text
    for forwarder, base in bench_report.RATIOS:
        assert f"## {forwarder} / {base}" in text
    for png in ("loss-vs-rate.png", "cpu-per-copy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "bench.json").stat().st_size > 0  # the raw records beside the report


@pytest.mark.parametrize(
    ("group", "mac"),
    [("224.0.0.251", "01:00:5e:00:00:fb"), ("239.255.255.250", "01:00:5e:7f:ff:fa")],
)
def test_multicast_mac(group: str, mac: str) -> None:
    assert multicast_mac(group) == mac


def test_frame_size_counts_headers() -> None:
    assert Flow("10.1.0.10", "224.0.0.251", "01:00:5e:00:00:fb", 64, 5353).frame_size == 106


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clients", "0"], "positive numbers"),
        (["--payloads", "x"], "numbers like"),
        (
            ["--forwarders", "plugin,vpp"],
            "forwarders are plugin, forecast-bpf, forecast-bpf-local-out",
        ),
    ],
)
def test_bench_arguments_are_checked(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["lab", "bench", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
