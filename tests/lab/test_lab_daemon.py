"""forecast-bpf's daemon in the lab: real XFRM interface, real ESP, real charons. The same
scenario script serves both runs; it prints one RESULT per check (tests/lab/scripts/daemon.py)."""

from __future__ import annotations

from tests.lab.conftest import LabRunner, ScenarioRun

COUNT = 20


def _all_ok(run: ScenarioRun) -> None:
    failed = [r for r in run.results if not r["ok"]]
    assert run.rc == 0 and not failed, run.output
    assert run.results[-1]["name"] == "stopping the daemon leaves nothing behind"


def test_daemon_two_clients_with_reinject(lab: LabRunner) -> None:
    run = lab.script(
        "daemon.py", "--gateway-mode", "forecast-bpf", "--clients", "2", script_args=("reinject",)
    )
    _all_ok(run)
    assert len(run.results) == 14
    c1 = run.result("c1 -> 239.255.255.250")["detail"]
    assert c1["c2"]["received"] == c1["lan"]["received"] == COUNT and c1["c1"]["received"] == 0
    assert all(v["received"] == 0 for v in run.result("LAN -> 239.1.2.3")["detail"].values())
    counters = run.result("status --json counters")["detail"]
    assert counters["want"] == counters["got"]
    assert (
        run.result("CHILD_SA rekey followed")["detail"]["before"]
        != run.result("CHILD_SA rekey followed")["detail"]["after"]
    )


def test_daemon_three_clients_without_reinject_one_without_broadcast(lab: LabRunner) -> None:
    run = lab.script(
        "daemon.py",
        "--gateway-mode",
        "forecast-bpf",
        "--clients",
        "3",
        "--no-broadcast",
        "c3",
        script_args=("no-reinject",),
    )
    _all_ok(run)
    bc = run.result("LAN -> 10.1.255.255")["detail"]
    assert bc["c1"]["received"] == bc["c2"]["received"] == COUNT
    assert bc["c3"]["received"] == 0  # its SA never negotiated the broadcast
    mc = run.result("LAN -> 239.255.255.250 reaches ['c1', 'c2', 'c3']")["detail"]
    assert all(mc[c]["received"] == COUNT for c in ("c1", "c2", "c3"))
    # Without reinject a client's multicast reaches the LAN only.
    c1 = run.result("c1 -> 239.255.255.250 reaches ['lan']")["detail"]
    assert c1["lan"]["received"] == COUNT
    assert c1["c2"]["received"] == c1["c3"]["received"] == c1["c1"]["received"] == 0
