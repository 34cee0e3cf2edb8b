"""The lab on this machine's kernel with user-space ESP (kernel-libipsec): real charons over
VICI in real namespaces. Real kernel ESP is the lab tier's job (VM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forecast_lab import ipsec_state, netns, runner
from forecast_lab.charon import CharonError
from forecast_lab.conns import GatewayMode
from forecast_lab.lab import Lab, LabOptions


def _pids_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if os.path.exists(f"/proc/{p}")]


def test_three_clients_connect_with_unique_marks_and_pool_addresses(run_prefix: str) -> None:
    opts = LabOptions(clients=3, libipsec=True, prefix=f"{run_prefix}a")
    with Lab(opts, log=sys.stderr) as lab:
        pids = [c.proc.pid for c in lab.charons.values() if c.proc]
        children = lab.child_sas("gw")
        assert len(children) == 3
        marks = {c["mark-in"] for c in children}
        assert len(marks) == 3 and "00000000" not in marks
        assert all(c["mark-in"] == c["mark-out"] for c in children)
        vips = sorted(c.virtual_ip for c in lab.topology.clients)
        assert vips == ["10.1.0.129", "10.1.0.130", "10.1.0.131"]
        assert sorted(c["remote-vips"] for c in children) == vips
        assert all("224.0.0.0/4" in c["remote-ts"] for c in children)
        # The client side sees the same SA from its own charon.
        c1 = ipsec_state.child_sas(lab.topology.clients[0].vici_socket)
        assert len(c1) == 1 and c1[0]["local-vips"] == lab.topology.clients[0].virtual_ip
    assert not netns.list_with_prefix(opts.prefix)
    assert not _pids_alive(pids), "charons outlived the lab"
    assert not lab.workdir.exists()


def test_forecast_bpf_mode_installs_if_id_on_the_gateway(run_prefix: str) -> None:
    opts = LabOptions(
        clients=1, libipsec=True, mode=GatewayMode.FORECAST_BPF, if_id=77, prefix=f"{run_prefix}b"
    )
    with Lab(opts) as lab:
        child = lab.child_sas("gw")[0]
        assert int(child["if-id-in"], 16) == 77 and int(child["if-id-out"], 16) == 77
        assert child["mark-in"] != "00000000"


def test_no_broadcast_client_is_narrowed_by_the_gateway(run_prefix: str) -> None:
    opts = LabOptions(
        clients=2, libipsec=True, no_broadcast=frozenset({"c2"}), prefix=f"{run_prefix}e"
    )
    with Lab(opts) as lab:
        by_id = {c["remote-id"]: c for c in lab.child_sas("gw")}
    assert "10.1.255.255/32" in by_id["c1@forecast.lab"]["remote-ts"]
    assert by_id["c1@forecast.lab"]["name"] == "rw"
    assert "10.1.255.255" not in by_id["c2@forecast.lab"]["remote-ts"]
    assert by_id["c2@forecast.lab"]["name"] == "rw-nobcast"


def test_script_sees_the_topology_and_its_exit_code_is_returned(
    run_prefix: str, tmp_path: Path
) -> None:
    script = tmp_path / "probe.sh"
    out = tmp_path / "seen.json"
    script.write_text(
        "#!/bin/sh\n"
        f"ip -j addr show dev eth1 > {out}.addr\n"
        f'cp "$FORECAST_LAB_TOPOLOGY" {out}\n'
        'test -S "$FORECAST_LAB_GW_VICI_SOCKET" || exit 9\n'
        "exit 3\n"
    )
    script.chmod(0o755)
    with Lab(LabOptions(clients=2, libipsec=True, prefix=f"{run_prefix}c")) as lab:
        rc = lab.run_script(str(script))
    assert rc == 3
    seen = json.loads(out.read_text())
    assert [c["name"] for c in seen["clients"]] == ["c1", "c2"]
    assert all(c["virtual_ip"] for c in seen["clients"])
    # The script ran inside the gateway's namespace: eth1 is the gateway's LAN side.
    addr = json.loads(Path(f"{out}.addr").read_text())
    assert addr[0]["addr_info"][0]["local"] == "10.1.0.1"


def test_failed_bring_up_leaves_nothing(run_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from forecast_lab import conns

    monkeypatch.setattr(conns, "BASE_PLUGINS", [*conns.BASE_PLUGINS, "no-such-plugin"])
    prefix = f"{run_prefix}d"
    with (
        pytest.raises(CharonError, match="plugin no-such-plugin is not installed"),
        Lab(LabOptions(clients=1, libipsec=True, prefix=prefix)),
    ):
        pass
    assert not netns.list_with_prefix(prefix)


def test_cli_up_shell_down(run_prefix: str) -> None:
    cli = [sys.executable, "-m", "forecast", "lab"]
    up = subprocess.run(
        [*cli, "up", "--libipsec", "--clients", "2"], capture_output=True, text=True, timeout=60
    )
    assert up.returncode == 0, up.stderr
    prefix = up.stdout.split()[1]
    try:
        assert runner.state_path(prefix).exists()
        assert len(netns.list_with_prefix(prefix)) == 5  # sw, gw, lan, c1, c2
        shell = subprocess.run(
            [*cli, "shell", prefix],
            input="echo $FORECAST_LAB_CLIENTS; ip -br addr show eth1\n",
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "SHELL": "/bin/sh"},
        )
        assert shell.returncode == 0, shell.stderr
        assert "c1 c2" in shell.stdout and "10.1.0.1/16" in shell.stdout
        ran = subprocess.run(
            [*cli, "exec", "--lab", prefix, "sh", "-c", "ip -br addr show eth1; exit 4"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ran.returncode == 4 and "10.1.0.1/16" in ran.stdout
    finally:
        down = subprocess.run([*cli, "down", prefix], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not netns.list_with_prefix(prefix)
    assert not runner.state_path(prefix).exists()
    again = subprocess.run([*cli, "down", prefix], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and f"no lab {prefix} is up" in again.stderr
