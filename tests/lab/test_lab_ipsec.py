"""Real IPsec (kernel ESP) in the lab: the demo, forecast-bpf's IPsec settings, the operator's
own `lab run`, and the programs on the newer lab kernel. (strongSwan's plugin as the reference:
tests/reference.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from forecast import layout
from tests.lab.conftest import LabRunner

COUNT = 20  # checks.DEFAULT_COUNT packets per sender


def test_demo(lab: LabRunner) -> None:
    """What `make demo` runs: forecast-bpf's daemon forwarding over both families, its
    status, a clean stop."""
    run = lab.lab("demo", "--ipv6", "--clients", "2")
    assert run.rc == 0, run.output
    assert re.search(r"tunnels up in [\d.]+ s: c1=10\.1\.0\.\d+, c2=10\.1\.0\.\d+", run.output)
    assert "7 passed, 0 failed" in run.output
    assert "PASS  LAN -> ff02::fb reaches ['c1', 'c2'] once" in run.output
    assert re.search(r"copies by family: IPv4 LAN>SA \d+ .* \| IPv6 LAN>SA [1-9]", run.output)
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
