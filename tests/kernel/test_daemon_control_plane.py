"""The daemon's control plane against real charons (kernel-libipsec) in the lab topology:
SA slot, MARK rules and route on connect; a rekey followed; a disconnect cleaned up; a stop
that leaves nothing behind. Forwarding itself needs real XFRM (lab tier) or the stand-ins of
test_datapath.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

from forecast import tc
from forecast.datapath import program_digest
from forecast.lab import netns
from forecast.lab.conns import GatewayMode
from forecast.lab.lab import Lab, LabOptions
from tests.kernel.daemon_fixture import DAEMON_PYTHON, IF_ID, Running


def forecast_cli(
    command: str, config: Path, *args: str, netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`forecast-bpf COMMAND --config CONFIG ARGS` as an operator types it (in `netns`)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(
        [*prefix, DAEMON_PYTHON, "-m", "forecast", command, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _slot_of(state: dict[str, Any], remote_id: str) -> dict[str, Any]:
    for slot, info in state["slots"].items():
        if info["remote_id"] == remote_id:
            return dict(info, slot=int(slot))
    raise AssertionError(f"{remote_id} not in {state['slots']}")


def test_connect_rekey_disconnect_stop(running: Running) -> None:
    lab = running.lab
    gw_ifindex = {name: netns.ifindex(running.gw, name) for name in ("eth1", "xfs0")}
    assert running.state()["slots"] == {}
    build = program_digest()
    assert tc.bpf_filters(gw_ifindex["eth1"], netns=running.gw) == [
        (tc.DEFAULT_PRIO, f"fc_lan_ingress-{build}")
    ]
    assert tc.bpf_filters(gw_ifindex["xfs0"], netns=running.gw) == [
        (tc.DEFAULT_PRIO, f"fc_tunnel_ingress-{build}")
    ]

    # Root's alone, though the daemon was started with umask 0: the state file (every peer's
    # identity), its lock, the pin directory and every map and program pinned in it.
    private = [running.state_file, running.state_file.with_suffix(".lock"), running.pin_dir]
    private += sorted(running.pin_dir.rglob("*"))
    modes = {str(p): p.stat().st_mode & 0o777 for p in private}
    assert len(modes) > 10 and all(m & 0o077 == 0 for m in modes.values()), modes
    # The metrics endpoint listens on loopback only (the default).
    listening = netns.run(["ss", "-Hltn"], netns=running.gw).stdout.split("\n")
    assert [ln.split()[3] for ln in listening if ":9719" in ln] == ["127.0.0.1:9719"]

    # Groups joined on the LAN interface (IGMP-snooping switches then deliver them).
    maddr = netns.run(["ip", "maddr", "show", "dev", "eth1"], netns=running.gw).stdout
    for group in ("224.0.0.251", "224.0.0.252", "239.255.255.250"):
        assert f"inet  {group}" in maddr, maddr

    # -- connect: slot, rules, route -------------------------------------------------------
    lab.connect_all()
    state = running.wait("two SAs", lambda s: len(s["slots"]) == 2)
    c1, c2 = (lab.topology.host(n) for n in ("c1", "c2"))
    s1 = _slot_of(state, "c1@forecast.lab")
    s2 = _slot_of(state, "c2@forecast.lab")
    assert s1["virtual_ips"] == [c1.virtual_ip] and s1["reinject"]
    assert s1["mark_in"] != s2["mark_in"] and s1["slot"] != s2["slot"]
    assert "224.0.0.0/4" in s1["selectors"]
    rules = running.rules()
    for host, s in ((c1, s1), (c2, s2)):
        mark = f"--set-xmark {s['mark_in']:#x}/0xffffffff"
        assert any(
            f"-d {host.virtual_ip}/32" in r and "FORECAST-PRE" in r and mark in r for r in rules
        ), rules
        assert any(
            f"-d {host.virtual_ip}/32" in r and "FORECAST-OUT" in r and mark in r for r in rules
        ), rules
        # libipsec forces UDP encapsulation: the inbound rule matches the NAT-T ports.
        assert any(
            f"-s {host.wan_addr}/32" in r and "--sport 4500 --dport 4500" in r and mark in r
            for r in rules
        ), rules
        assert re.search(rf"^{re.escape(host.virtual_ip)} dev xfs0 ", running.routes(), re.M)

    # -- status reads the live maps --------------------------------------------------------
    out = forecast_cli("status", running.cfg_path, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["schema"] == 1 and len(doc["sas"]) == 2
    assert {sa["remote_id"] for sa in doc["sas"]} == {"c1@forecast.lab", "c2@forecast.lab"}
    assert all(sa["counters"]["lan_to_sa"]["packets"] == 0 for sa in doc["sas"])

    # -- rekey: same slot and mark, new SPI ------------------------------------------------
    lab.rekey_child("c1")
    state = running.wait(
        "c1's new SPI", lambda s: _slot_of(s, "c1@forecast.lab")["spi_in"] != s1["spi_in"]
    )
    r1 = _slot_of(state, "c1@forecast.lab")
    assert (r1["slot"], r1["mark_in"]) == (s1["slot"], s1["mark_in"])
    assert r1["unique_id"] != s1["unique_id"]

    # -- disconnect c2: its slot, rules and route go ---------------------------------------
    lab.disconnect("c2")
    running.wait("c2 gone", lambda s: len(s["slots"]) == 1)
    assert not any(c2.virtual_ip in r for r in running.rules())
    assert c2.virtual_ip not in running.routes()
    assert c1.virtual_ip in running.routes()

    # -- charon restarts: the daemon reconnects and takes a fresh snapshot -----------------
    gw_charon = lab.charons["gw"]
    gw_charon.stop()
    running.wait("VICI gone", lambda s: not s["vici_connected"])
    gw_charon.start()
    lab.load_gateway()
    running.wait("reconnected, no SAs", lambda s: s["vici_connected"] and not s["slots"])
    assert not any(c1.virtual_ip in r for r in running.rules())
    lab.connect("c1")
    running.wait("c1 back after the restart", lambda s: len(s["slots"]) == 1)

    # -- stop: nothing left ----------------------------------------------------------------
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=30) == 0, running.log.read_text()
    assert running.rules() == []
    assert running.routes().strip() == ""
    assert tc.bpf_filters(gw_ifindex["eth1"], netns=running.gw) == []
    assert tc.bpf_filters(gw_ifindex["xfs0"], netns=running.gw) == []
    assert not running.state_file.exists()
    assert not running.pin_dir.exists() or not any(running.pin_dir.iterdir())
    # The stand-in was given, not created: the daemon must not have deleted it.
    netns.run(["ip", "link", "show", "xfs0"], netns=running.gw)
    log = running.log.read_text()
    assert "SA added: rw/rw" in log and "SA rekeyed: rw/rw" in log and "SA removed: rw/rw" in log
    assert re.search(r"netfilter back end: iptables \((nf_tables|legacy)\)", log)
    assert "VICI reconnected" in log
    assert os.path.exists(running.lab.topology.gateway.vici_socket)  # charon itself untouched


def test_check_tells_what_each_child_lacks(run_prefix: str, tmp_path: Path) -> None:
    """`check` against live SAs: the seed's config lacks the if_id; forecast-bpf's has it."""
    for mode, want_rc, want in (
        (GatewayMode.SEED, 1, "set if_id_in = if_id_out = 42"),
        (GatewayMode.FORECAST_BPF, 1, "set set_mark_in = %same"),
    ):
        opts = LabOptions(
            clients=1, libipsec=True, mode=mode, if_id=IF_ID, prefix=f"{run_prefix}k{mode.value[0]}"
        )
        with Lab(opts) as lab:
            cfg = tmp_path / f"{mode.value}.yaml"
            cfg.write_text(
                f"vici_socket: {lab.topology.gateway.vici_socket}\nxfrm: {{if_id: {IF_ID}}}\n"
            )
            out = forecast_cli("check", cfg, netns=lab.topology.gateway.netns)
        assert out.returncode == want_rc, out.stdout + out.stderr
        assert "MISSING  rw/rw #1 (c1@forecast.lab" in out.stdout
        assert want in out.stdout
        if mode is GatewayMode.FORECAST_BPF:
            # Marks and if_id are right; only libipsec's missing kernel SA (no set_mark_in
            # visible) is reported. The lab tier sees `check` pass on real XFRM.
            assert "if_id" not in out.stdout and "unique mark" not in out.stdout


def test_status_and_check_without_a_daemon_or_charon(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_file: {tmp_path}/none.json\nvici_socket: {tmp_path}/none.vici\n")
    status = forecast_cli("status", cfg)
    assert status.returncode == 3
    assert f"forecast-bpf is not running (no {tmp_path}/none.json)" in status.stderr
    check = forecast_cli("check", cfg)
    assert check.returncode == 2 and "cannot read strongSwan's SAs" in check.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: [10.0.0.1]\n")
    run = forecast_cli("run", bad)
    assert run.returncode == 2
    assert run.stderr.strip() == (
        f"forecast-bpf: error: {bad}: groups: 10.0.0.1 is not a multicast address (224.0.0.0/4)"
    )
