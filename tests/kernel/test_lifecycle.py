"""Restart, crash, reload and stop of the real daemon (the CLI's own code path, a veth standing
in for the XFRM interface) against real charons: the data path outlives the daemon, the next
daemon adopts it and converges to the live SAs, and only a deliberate stop removes it.

Copies are counted per SA mark where they leave through the stand-in (a mangle rule per mark on
its peer), so "no copy lost" is a count, not an impression."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from forecast import tc
from forecast.datapath import program_digest
from forecast_lab import netns, traffic
from tests.kernel.daemon_fixture import Running
from tests.kernel.test_daemon_control_plane import forecast_cli

GROUP = "239.255.255.250"
PORT = 5353


def _count_copies(running: Running, marks: list[int]) -> None:
    """Copies leave xfs0 and arrive on xfs0p: one counting rule per mark, then a sink."""
    rules = "\n".join(
        [
            "*raw",
            ":FCCOUNT - [0:0]",
            "-A PREROUTING -i xfs0p -j FCCOUNT",
            *[f"-A FCCOUNT -m mark --mark {m:#x}" for m in marks],
            "-A PREROUTING -i xfs0p -j DROP",
            "COMMIT",
            "",
        ]
    )
    netns.run(["iptables-restore", "--noflush"], netns=running.gw, input_text=rules)


def _copies(running: Running) -> dict[int, int]:
    out = netns.run(["iptables-save", "-c", "-t", "raw"], netns=running.gw).stdout
    return {
        int(m[2], 16): int(m[1])
        for m in re.finditer(r"\[(\d+):\d+\] -A FCCOUNT -m mark --mark (0x[0-9a-f]+)", out)
    }


def _marks(state: dict[str, Any]) -> dict[str, int]:
    return {v["remote_id"].split("@")[0]: int(v["mark_out"]) for v in state["slots"].values()}


def _ready(running: Running, pid: int, what: str, pred: Any = None) -> dict[str, Any]:
    return running.wait(
        what,
        lambda s: s.get("pid") == pid and s["vici_connected"] and (pred is None or pred(s)),
        seconds=60,
    )


def test_restart_hands_over_and_loses_no_copy(running: Running) -> None:
    lab = running.lab
    lab.connect_all()
    state = running.wait("two SAs", lambda s: len(s["slots"]) == 2)
    marks = _marks(state)
    _count_copies(running, list(marks.values()))
    lan = lab.topology.lan_host.netns
    count, interval = 1500, 0.004  # 250/s for 6 s, across the whole restart
    sender = traffic.send(lan, GROUP, PORT, "restart", count, interval=interval, background=True)
    assert sender is not None
    time.sleep(1.0)

    old_pid = running.proc.pid
    running.proc.send_signal(signal.SIGUSR2)
    assert running.proc.wait(timeout=30) == 0
    t0 = time.monotonic()
    running.spawn()
    _ready(running, running.proc.pid, "the next daemon's first snapshot")
    restart_s = time.monotonic() - t0
    assert sender.wait(timeout=60) == 0, sender.stderr.read() if sender.stderr else ""
    time.sleep(0.5)

    copies = _copies(running)
    print(
        f"restart under {1 / interval:.0f} pps: hand-over + adopt {restart_s:.2f} s; "
        f"copies per SA {copies} of {count} sent"
    )
    assert copies == {mark: count for mark in marks.values()}
    log = running.log.read_text()
    assert "stopped for a restart; the data path keeps forwarding" in log
    build = program_digest()
    assert f"programs build {build} adopted from" in log  # no compile on a restart
    assert log.count(f"filter fc_lan_ingress-{build} on ifindex") == 2  # attached, then kept
    assert "(forwarding never stopped)" in log
    assert "adopted 2 SA slots from the pinned maps" in log
    assert running.state()["pid"] != old_pid


def test_crash_keeps_forwarding_and_restart_converges(running: Running) -> None:
    lab = running.lab
    lab.connect_all()
    state = running.wait("two SAs", lambda s: len(s["slots"]) == 2)
    marks = _marks(state)
    c2 = lab.topology.host("c2")
    _count_copies(running, list(marks.values()))

    running.proc.send_signal(signal.SIGKILL)
    running.proc.wait(timeout=10)
    # status tells the daemon is down while its data path forwards.
    out = forecast_cli("status", running.cfg_path, "--json", netns=running.gw)
    assert out.returncode == 1, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["daemon"]["running"] is False and len(doc["sas"]) == 2
    table = forecast_cli("status", running.cfg_path, netns=running.gw)
    assert "daemon DOWN" in table.stdout and "still forwards" in table.stdout, table.stdout

    # c2 leaves while no daemon runs; forwarding to c1 never stops meanwhile.
    lab.disconnect("c2")
    traffic.send(lab.topology.lan_host.netns, GROUP, PORT, "crash", 20)
    time.sleep(0.3)
    assert _copies(running)[marks["c1"]] == 20

    t0 = time.monotonic()
    running.spawn()
    state = _ready(running, running.proc.pid, "the restarted daemon's snapshot")
    converged_s = time.monotonic() - t0
    # READY comes after the first snapshot is applied: the daemon's own account of when.
    log = running.log.read_text()
    ready = re.findall(r"ready: .*, ([\d.]+ s after the process started.*)", log)
    assert len(ready) == 2, log
    print(
        f"crash restart: c2 gone from slots, rules and routes at READY, {ready[-1]}; "
        f"{converged_s:.2f} s after spawn as this test saw it"
    )
    # At READY the kernel holds exactly the live SA: c2's slot, rules and route are gone.
    assert list(_marks(state)) == ["c1"]
    assert not any(c2.virtual_ip in r for r in running.rules())
    assert c2.virtual_ip not in running.routes()
    assert lab.topology.host("c1").virtual_ip in running.routes()
    slots = json.loads(forecast_cli("status", running.cfg_path, "--json", netns=running.gw).stdout)[
        "sas"
    ]
    assert [s["remote_id"] for s in slots] == ["c1@forecast.lab"]
    # The slot kept its counters across the crash (same SA, same slot).
    assert slots[0]["counters"]["lan_to_sa"]["packets"] >= 20


def test_stop_removes_what_a_hand_over_left(running: Running) -> None:
    running.lab.connect_all()
    running.wait("two SAs", lambda s: len(s["slots"]) == 2)
    eth1 = netns.ifindex(running.gw, "eth1")
    running.proc.send_signal(signal.SIGUSR2)
    assert running.proc.wait(timeout=30) == 0
    assert tc.our_filter(eth1, netns=running.gw) is not None
    assert running.rules() and running.routes().strip()

    out = forecast_cli("stop", running.cfg_path, netns=running.gw)
    assert out.returncode == 0, out.stderr
    assert "MARK rules" in out.stdout and "pins in" in out.stdout, out.stdout
    assert running.rules() == [] and running.routes().strip() == ""
    assert tc.our_filter(eth1, netns=running.gw) is None
    assert tc.our_filter(netns.ifindex(running.gw, "xfs0"), netns=running.gw) is None
    assert not running.pin_dir.exists() and not running.state_file.exists()
    netns.run(["ip", "link", "show", "xfs0"], netns=running.gw)  # given, not ours: kept
    again = forecast_cli("stop", running.cfg_path, netns=running.gw)
    assert again.returncode == 0 and "nothing left to remove" in again.stdout
    status = forecast_cli("status", running.cfg_path, netns=running.gw)
    assert status.returncode == 3


def test_reload_changes_groups_reinject_and_log_level(running: Running) -> None:
    running.lab.connect_all()
    running.wait("two SAs", lambda s: len(s["slots"]) == 2)
    text = running.cfg_path.read_text().replace("reinject: [rw]\n", "reinject: []\n")
    running.cfg_path.write_text(
        text + "groups: [224.0.0.251, 239.1.2.3]\nlog_level: debug\nmetrics_address: 127.0.0.1:1\n"
        "metrics_per_sa: false\ngroups6: [ff02::fb, ff05::1:3]\n"
    )
    before = _scrape(running)
    assert "forecast_sa_packets_total{" in before
    pid = running.proc.pid
    running.proc.send_signal(signal.SIGHUP)
    state = running.wait(
        "reinject off", lambda s: not any(v["reinject"] for v in s["slots"].values())
    )
    assert state["pid"] == pid and state["groups"] == ["224.0.0.251", "239.1.2.3"]
    assert state["groups6"] == ["ff02::fb", "ff05::1:3"]
    maddr = netns.run(["ip", "maddr", "show", "dev", "eth1"], netns=running.gw).stdout
    assert "239.1.2.3" in maddr and "239.255.255.250" not in maddr, maddr
    # the IPv6 memberships follow groups6 too (MLD): one joined, one left
    assert "inet6 ff05::1:3" in maddr and "inet6 ff02::c" not in maddr, maddr
    # A broken file on reload: an error line, the running configuration stays.
    running.cfg_path.write_text(text + "groups: [10.0.0.1]\n")
    running.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload failed" not in running.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running.proc.poll() is None
    running.lab.disconnect("c2")  # debug lines flow, pyroute2's netlink dumps do not
    running.wait("c2 gone", lambda s: len(s["slots"]) == 1)
    log = running.log.read_text()
    assert "groups now 224.0.0.251, 239.1.2.3 (joined 239.1.2.3, left 224.0.0.1" in log
    # metrics_per_sa: false took effect in place: the per-connection sums stay.
    after = _scrape(running)
    assert "forecast_sa_packets_total{" not in after
    assert 'forecast_connection_packets_total{direction="lan_to_sa",ike_name="rw"}' in after
    assert "reload: metrics_address changed; it takes effect at the next restart" in log
    assert "reload failed, the running configuration stays" in log
    assert "pyroute2" not in log and "nlmsg" not in log
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=30) == 0
    assert "Traceback" not in running.log.read_text()


def _scrape(running: Running) -> str:
    """The exporter's page, from inside the gateway's namespace (the default address)."""
    code = (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
        "'http://127.0.0.1:9719/metrics', timeout=10).read().decode())"
    )
    return netns.run([sys.executable, "-c", code], netns=running.gw, timeout=30).stdout


def test_run_as_non_root_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("log_level: info\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(cfg, 0o644)
    out = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "forecast",
            "run",
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "forecast-bpf: error: `run` needs root (it loads BPF programs, changes links, routes "
        "and netfilter rules): run it as root or through systemd"
    ]
