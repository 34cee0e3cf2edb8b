"""forecast-bpf's daemon in the lab: real XFRM interface, real ESP, real charons. The same
scenario script serves both runs; it prints one RESULT per check (tests/lab/scripts/daemon.py)."""

from __future__ import annotations

from tests.lab.conftest import LabRunner, ScenarioRun

COUNT = 20


def _all_ok(run: ScenarioRun) -> None:
    failed = [r for r in run.results if not r["ok"]]
    assert run.rc == 0 and not failed, run.output
    assert run.results[-1]["name"] == "stopping the daemon leaves nothing behind"


def test_daemon_three_clients(lab: LabRunner) -> None:
    """c3's gateway child (rw-nobcast) lacks the broadcast TS and is the only one in
    `reinject`: broadcast skips c3, c1's multicast reaches c3 but not c2."""
    run = lab.script(
        "daemon.py",
        "--gateway-mode",
        "forecast-bpf",
        "--clients",
        "3",
        "--no-broadcast",
        "c3",
        script_args=("rw-nobcast",),
    )
    _all_ok(run)
    assert len(run.results) == 16
    # LAN protection with real ESP: c1's OSPF reached nobody, and its SA counted both refusals.
    ospf = run.result("c1 -> 224.0.0.5 reaches [] once")["detail"]
    assert {"c2", "c3", "lan"} <= set(ospf) and all(v["received"] == 0 for v in ospf.values())
    assert run.result("c1's OSPF packets are counted")["ok"]
    bc = run.result("LAN -> 10.1.255.255")["detail"]
    assert bc["c1"]["received"] == bc["c2"]["received"] == COUNT
    assert bc["c3"]["received"] == 0  # its SA never negotiated the broadcast
    mc = run.result("LAN -> 239.255.255.250 reaches ['c1', 'c2', 'c3']")["detail"]
    assert all(mc[c]["received"] == COUNT for c in ("c1", "c2", "c3"))
    assert all(v["received"] == 0 for v in run.result("LAN -> 239.1.2.3")["detail"].values())
    # Reinjection by target config: c3 (rw-nobcast, in reinject) yes, c2 (rw, not) no.
    c1 = run.result("c1 -> 239.255.255.250 reaches ['c3', 'lan']")["detail"]
    assert c1["lan"]["received"] == c1["c3"]["received"] == COUNT
    assert c1["c2"]["received"] == 0 and c1["c1"]["received"] == 0  # no echo to the origin
    counters = run.result("status --json counters")["detail"]
    assert counters["want"] == counters["got"]
    rekey = run.result("CHILD_SA rekey followed")["detail"]
    assert rekey["before"] != rekey["after"]
