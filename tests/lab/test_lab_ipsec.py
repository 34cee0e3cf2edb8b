"""Real IPsec (kernel ESP) in the lab: tunnels, unicast, and strongSwan's forecast plugin as the
reference every later forecast-bpf test and benchmark compares against."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from forecast import layout
from tests.lab.conftest import LabRunner

COUNT = 20  # checks.DEFAULT_COUNT packets per sender


def test_reference_plugin_forwards_exactly_once(lab: LabRunner) -> None:
    run = lab.script("reference.py", "--reference-plugin", "--clients", "2")
    assert run.rc == 0, run.output
    # Two clients with real ESP: ping VIP <-> LAN host both ways, gateway SA counters rise.
    # (The seed's policies carry marks, so forwarded unicast needs MARK rules: the plugin's.)
    unicast = run.result("unicast")["detail"]
    for client in ("c1", "c2"):
        assert unicast[client]["ping_to_lan"] and unicast[client]["ping_from_lan"], unicast
    sas = [v for k, v in unicast.items() if k.startswith("sa")]
    assert len(sas) == 2
    # 3 pings each way per client: at least 6 ESP packets in and out of every SA.
    assert all(sa["esp_in"] >= 6 and sa["esp_out"] >= 6 for sa in sas), sas
    mc = run.result("LAN -> 239.255.255.250")["detail"]
    bc = run.result("LAN -> 10.1.255.255")["detail"]
    for client in ("c1", "c2"):
        assert mc[client]["received"] == mc[client]["distinct"] == COUNT
        assert bc[client]["received"] == bc[client]["distinct"] == COUNT
    c1 = run.result("c1 -> 239.255.255.250")["detail"]
    assert c1["c2"]["received"] == c1["c2"]["distinct"] == COUNT
    assert c1["lan"]["received"] == c1["lan"]["distinct"] == COUNT
    assert c1["c1"]["received"] == 0  # never echoed to the origin


def test_reference_plugin_sends_broadcast_only_where_negotiated(lab: LabRunner) -> None:
    run = lab.script(
        "broadcast_narrowing.py",
        "--reference-plugin",
        "--clients",
        "2",
        "--no-broadcast",
        "c2",
        script_args=("c2",),
    )
    assert run.rc == 0, run.output
    bc = run.result("LAN -> 10.1.255.255")["detail"]
    assert bc["c1"]["received"] == COUNT and bc["c2"]["received"] == 0
    mc = run.result("LAN -> 239.255.255.250")["detail"]
    assert mc["c1"]["received"] == mc["c2"]["received"] == COUNT


def test_seed_gateway_without_a_forwarder_forwards_nothing(lab: LabRunner) -> None:
    # The same topology without the plugin: the scenario must fail, or the reference test above
    # could pass on something other than the plugin.
    run = lab.script("reference.py", "--clients", "2", script_args=("lan-multicast-only",))
    assert run.rc == 1, run.output
    mc = run.result("LAN -> 239.255.255.250")
    assert not mc["ok"]
    assert all(v["received"] == 0 for v in mc["detail"].values())


def test_demo(lab: LabRunner) -> None:
    """What `make demo` runs: forecast-bpf's daemon forwarding, its status, a clean stop."""
    run = lab.lab("demo", "--clients", "2")
    assert run.rc == 0, run.output
    assert re.search(r"tunnels up in [\d.]+ s: c1=10\.1\.0\.\d+, c2=10\.1\.0\.\d+", run.output)
    assert "4 passed, 0 failed" in run.output
    assert "$ forecast-bpf status" in run.output and "c2@forecast.lab" in run.output
    assert "daemon stopped: no rule, route, filter, interface or pin left behind" in run.output


def test_forecast_bpf_mode_sets_if_id_and_inbound_mark(lab: LabRunner) -> None:
    run = lab.script(
        "gateway_xfrm.sh", "--gateway-mode", "forecast-bpf", "--if-id", "42", "--clients", "1"
    )
    assert run.rc == 0, run.output
    states = run.output.split("=== policies")[0]
    assert states.count("if_id 0x2a") == 2  # inbound and outbound SA
    assert re.search(r"output-mark 0x[1-9a-f][0-9a-f]*/0xffffffff", states), states
    policies = run.output.split("=== policies")[1]
    assert "if_id 0x2a" in policies and "mark 0x" in policies


def test_reference_plugin_on_kernel_6_12(lab_612: LabRunner) -> None:
    run = lab_612.script("reference.py", "--reference-plugin", "--clients", "2")
    assert run.rc == 0, run.output
    assert len(run.results) == 4 and all(r["ok"] for r in run.results)


def test_operator_lab_run_boots_its_own_vm(tmp_path: Path) -> None:
    """What an operator types: the CLI decides where to run, boots the VM if needed, copies a
    script from a guest-private path, and returns the script's exit code."""
    script = tmp_path / "mine.sh"
    script.write_text(
        "#!/bin/sh\n"
        'echo "clients=$FORECAST_LAB_CLIENTS kernel=$(uname -r)"\n'
        'test -S "$FORECAST_LAB_GW_VICI_SOCKET" || exit 11\n'
        'ip -br addr show dev "$FORECAST_LAB_GW_LAN_IF"\n'
        "exit 5\n"
    )
    script.chmod(0o755)
    proc = subprocess.run(
        [sys.executable, "-m", "forecast", "lab", "run", "--clients", "1", str(script)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "clients=c1 kernel=" in proc.stdout
    assert "10.1.0.1/16" in proc.stdout  # ran in the gateway's namespace
    assert re.search(r"lab: .*(running directly|booting the lab kernel)", proc.stderr)


def test_programs_verify_on_kernel_6_12(lab_612: LabRunner) -> None:
    """Both programs and their walkers, as shipped, pass 6.12's verifier (6.1 runs them in the
    daemon scenarios); the instruction counts are printed for docs/design.md."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "verifier_cost.py"
    run = lab_612.lab("run", "--clients", "1", str(script), str(layout.FC_CHUNK), timeout=600)
    print(run.output[-2000:])
    assert run.rc == 0, run.output
    lines = [ln for ln in run.output.splitlines() if ln.strip().startswith(str(layout.FC_CHUNK))]
    assert len(lines) == 2 and not any("rejected" in ln for ln in lines), run.output
    assert all(f"capacity {layout.FC_MAX_SAS:>6}" in ln for ln in lines)
