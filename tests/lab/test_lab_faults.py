"""Faults under load, in the lab with real ESP (tests/lab/scripts/resilience.py): rekeys and a
reauthentication, a killed daemon, a half-removed SA and a crashed charon, with a WAN capture
that must show nothing sent in clear. strongSwan's plugin through the same scenario is a
measurement, not a test of this project: `make bench-faults`."""

from __future__ import annotations

from collections.abc import Callable

from tests.lab.conftest import LabRunner, ScenarioRun


def _faults(lab: LabRunner, mode: str, rate: int) -> ScenarioRun:
    run = lab.script(
        "resilience.py",
        "--gateway-mode",
        mode,
        "--clients",
        "3",
        script_args=(str(rate),),
        timeout=900,
    )
    print(run.output[-5000:])
    return run


def _lost(run: ScenarioRun, phase: str) -> dict[str, int]:
    clients = run.result(f"{phase}: every copy")["detail"]["clients"]
    return {name: v["lost"] for name, v in clients.items()}


def test_forecast_bpf_under_faults(lab: LabRunner, figures: Callable[[str], None]) -> None:
    run = _faults(lab, "forecast-bpf", 1000)
    failed = [r for r in run.results if not r["ok"]]
    assert run.rc == 0 and not failed, run.output[-8000:]
    rekeys = run.result("rekeys: every copy")["detail"]["phase"]
    assert (rekeys["child_rekeys"], rekeys["ike_rekeys"]) == (20, 5)
    assert run.result("reauth: every copy")["detail"]["phase"]["reauths"] == 1
    crash = run.result("charon crash")["detail"]
    wan = run.result("no plaintext")["detail"]
    assert wan["clear"] == 0 and wan["encrypted"] > 10_000
    figures(
        f"forecast-bpf, 1,000 packets/s to 3 clients: copies lost with no fault "
        f"{_lost(run, 'baseline')}, in 20 CHILD + 5 IKE rekeys "
        f"{_lost(run, 'rekeys')}, in a reauthentication {_lost(run, 'reauth')}, daemon killed "
        f"{_lost(run, 'daemon_down')}, charon crashed {_lost(run, 'charon_down')}; after the "
        f"crash: daemon resynchronised in {crash['resync_s']} s, CHILD_SA up → first copy "
        f"{crash['up_to_first_copy_ms']} ms; WAN: {wan['encrypted']} encrypted, "
        f"{wan['clear']} clear"
    )
