"""`forecast-bpf lab bench --quick` in the session's lab VM: every forwarder (the plugin,
forecast-bpf's XFRM-interface path, its local output path for mark-only SAs), 2 clients, 64 B,
three rates of 2-s steps (the gateway's CPU is read in 10 ms ticks: a 1-s step can be a few
ticks), five connects. It checks that every figure of the report exists and is sane (the
benchmark must not rot), not that forecast-bpf beats a threshold: that is BENCHMARKS.md's job."""

from __future__ import annotations

import math
from pathlib import Path

from forecast_lab import bench_report
from forecast_lab.runner import QUICK_BENCH
from tests.lab.conftest import LabRunner


def test_quick_bench(lab: LabRunner, tmp_path: Path) -> None:
    run = lab.lab("bench", "--quick", timeout=1200)
    records = bench_report.parse(run.output)
    assert run.rc == 0 and records, run.output[-6000:]
    summ = bench_report.summary(records)
    print(bench_report.markdown(summ, []))

    steps = [r for r in records if r["kind"] == "step"]
    rates = sorted(set(QUICK_BENCH.rates))
    for forwarder in bench_report.FORWARDERS:
        for series, clients in (("multicast", 2), ("esp", 1)):
            mine = [s for s in steps if (s["forwarder"], s["series"]) == (forwarder, series)]
            assert sorted(s["offered_pps"] for s in mine) == rates, (forwarder, series)
            for s in mine:
                assert s["sent"] == int(s["offered_pps"] * QUICK_BENCH.step_seconds), s
                assert len(s["delivered_by_client"]) == clients
                assert 0 < s["delivered"] <= s["sent"] * clients, s
                assert 0.0 <= s["loss"] < 1.0
                assert all(v >= 0 for v in s["gateway_cpu_s"].values()), s
        # the lab delivers everything at the lowest rate, whoever forwards
        lowest = min(
            (s for s in steps if s["forwarder"] == forwarder and s["series"] == "multicast"),
            key=lambda s: s["offered_pps"],
        )
        assert lowest["loss"] <= 0.01, lowest

    for row in summ["rows"]:
        assert row["copies_per_s"] and row["copies_per_s"] > 0
        for key in ("us_per_copy", "esp_us_per_packet", "per_copy_over_esp"):
            assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, row
    assert [(r["forwarder"], r["base"]) for r in summ["ratios"]] == list(bench_report.RATIOS)
    for ratio in summ["ratios"]:
        assert ratio["us_per_copy"] is not None and ratio["us_per_copy"] > 0, ratio

    for forwarder in bench_report.FORWARDERS:
        lat = summ["latency"][forwarder]
        assert lat["measured"] == lat["connects"] == QUICK_BENCH.connects, lat
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] < 10_000, lat
        # sent may precede the bench's own VICI event (the plugin hears of the SA in-process)
        assert -1_000 < lat["sent_p50_ms"] <= lat["sent_p99_ms"] < 10_000, lat
    for rec in (r for r in records if r["kind"] == "latency"):
        for sample in rec["samples"]:
            # a copy is on the client's wire no later than the client decrypts it
            assert sample["up_to_first_esp_ms"] <= sample["up_to_first_copy_ms"], sample

    for forwarder in ("forecast-bpf", "forecast-bpf-local-out"):
        cold, warm = (s for s in summ["daemon_start"] if s["forwarder"] == forwarder)
        assert "compiled" in cold["build_line"] and "adopted" in warm["build_line"]
        assert cold["start_to_first_copy_s"] and warm["start_to_first_copy_s"] is not None
        assert "ready:" in cold["ready_line"] and "ready:" in warm["ready_line"]

    report = bench_report.write(records, tmp_path).read_text()
    for forwarder, base in bench_report.RATIOS:
        assert f"## {forwarder} / {base}" in report
