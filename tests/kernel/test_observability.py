"""Observability against real parts: a real Prometheus server scraping the running daemon, every
dashboard panel's PromQL evaluated through its HTTP API, `promtool check metrics`,
`status --watch` in a real terminal (tmux), and systemd's notify protocol.

Traffic is real: the LAN host's multicast goes through the real LAN program on the gateway,
which copies it to the XFRM stand-in; the counters move because packets moved.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forecast import tc
from forecast_lab import netns, traffic
from tests.kernel.daemon_fixture import Running, start_running

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "forecast-bpf.json"
METRICS = "127.0.0.1:9719"  # the default metrics_address, inside the gateway's namespace
PROM = "127.0.0.1:9090"
GROUP = "239.255.255.250"
# Where the observability run may leave its raw material for docs/ (scripts/render_docs.py).
DOCS_OUT = os.environ.get("FORECAST_DOCS_OUT")


def http_get(ns: str, url: str) -> str:
    """GET from inside the gateway's namespace (where both servers listen on loopback)."""
    code = (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], "
        "timeout=10).read().decode())"
    )
    return netns.run([sys.executable, "-c", code, url], netns=ns, timeout=30).stdout


def promql(ns: str, expr: str, *, at: float | None = None) -> list[dict[str, Any]]:
    params = {"query": expr, **({"time": str(at)} if at else {})}
    doc = json.loads(http_get(ns, f"http://{PROM}/api/v1/query?" + urllib.parse.urlencode(params)))
    assert doc["status"] == "success", doc
    return list(doc["data"]["result"])


def panel_exprs() -> list[tuple[str, str]]:
    """Every panel's PromQL as Grafana sends it with this gateway picked in the dashboard's
    job and instance variables."""
    dash = json.loads(DASHBOARD.read_text())
    return [
        (
            p["title"],
            t["expr"]
            .replace("$__rate_interval", "10s")
            .replace("$job", "forecast-bpf")
            .replace("$instance", METRICS),
        )
        for p in dash["panels"]
        for t in p["targets"]
    ]


def variable_values(ns: str) -> dict[str, list[str]]:
    """What each of the dashboard's query variables offers, from Prometheus' series API."""
    dash = json.loads(DASHBOARD.read_text())
    out = {}
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        label, match = _label_values(var["definition"].replace("$job", "forecast-bpf"))
        q = urllib.parse.urlencode({"match[]": match})
        doc = json.loads(http_get(ns, f"http://{PROM}/api/v1/label/{label}/values?{q}"))
        out[var["name"]] = list(doc["data"])
    return out


def _label_values(definition: str) -> tuple[str, str]:
    m = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
    assert m, definition
    return m[2], m[1]


@pytest.fixture
def running_with_prometheus(run_prefix: str, tmp_path: Path) -> Iterator[Running]:
    gen = start_running(run_prefix, tmp_path)
    running = next(gen)
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    (prom_dir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: forecast-bpf\n"
        f"    static_configs:\n      - targets: ['{METRICS}']\n"
    )
    prom = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            running.gw,
            "prometheus",
            f"--config.file={prom_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address={PROM}",
            "--log.level=warn",
        ],
        stdout=(prom_dir / "log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if "Ready" in http_get(running.gw, f"http://{PROM}/-/ready"):
                    break
            except Exception:
                time.sleep(0.3)
        else:
            raise AssertionError("prometheus never got ready:\n" + (prom_dir / "log").read_text())
        # Discovery hands new targets to the scrapers on a ~5 s throttle: wait for a scrape.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not promql(running.gw, 'up{job="forecast-bpf"} == 1'):
            time.sleep(0.5)
        assert promql(running.gw, 'up{job="forecast-bpf"} == 1'), "no successful scrape"
        yield running
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        next(gen, None)


def test_prometheus_scrapes_and_every_panel_returns_data(
    running_with_prometheus: Running, tmp_path: Path
) -> None:
    r = running_with_prometheus
    r.lab.connect_all()
    r.wait("two SAs", lambda s: len(s["slots"]) == 2)
    lan = r.lab.topology.lan_host.netns
    traffic.send(lan, GROUP, 1900, "prom", 30, iface="eth0")

    exposition = http_get(r.gw, f"http://{METRICS}/metrics")
    check = subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    lan_to_sa = re.findall(
        r'^forecast_sa_packets_total\{.*direction="lan_to_sa".*\} (\S+)$', exposition, re.M
    )
    assert [float(v) for v in lan_to_sa] == [30.0, 30.0], exposition
    # The per-connection sum, kept when per-SA series are switched off.
    assert re.search(
        r'^forecast_connection_packets_total\{direction="lan_to_sa",ike_name="rw"\} 60\.0$',
        exposition,
        re.M,
    ), exposition
    # Labels that join with strongSwan's exporters and name the client and its SA's mark.
    assert re.search(
        r'^forecast_sa_packets_total\{child_name="rw",direction="lan_to_sa",ike_name="rw",'
        r'mark="0x[0-9a-f]+",remote_id="c1@forecast\.lab"\} 30\.0$',
        exposition,
        re.M,
    ), exposition
    # The same copies by address family: all of them IPv4 here.
    assert re.search(
        r'^forecast_family_packets_total\{direction="lan_to_sa",family="ipv4"\} 60\.0$',
        exposition,
        re.M,
    ), exposition
    assert re.search(
        r'^forecast_family_packets_total\{direction="lan_to_sa",family="ipv6"\} 0\.0$',
        exposition,
        re.M,
    ), exposition
    assert re.search(
        r'^forecast_build_info\{kernel=".+",netfilter="(nftables|iptables)",'
        r'version="0\.1\.0"\} 1\.0$',
        exposition,
        re.M,
    )
    assert "forecast_vici_connected 1.0" in exposition
    # Apply times: at least the start-up snapshot and the two connects' event bursts.
    assert re.search(r'^forecast_apply_seconds_count\{trigger="snapshot"\} [1-9]', exposition, re.M)
    assert re.search(
        r'^forecast_apply_seconds_bucket\{le="\+Inf",trigger="event"\} ', exposition, re.M
    )
    assert "remote_ts" not in exposition and "224.0.0.0" not in exposition  # low cardinality

    # Several scrapes with traffic in between, so rates have two samples to work with.
    for i in range(4):
        traffic.send(lan, GROUP, 1900, f"prom{i}", 10, iface="eth0")
        time.sleep(1.2)
    empty = []
    # The dashboard's variables offer this gateway, and its panels, with it picked, have data.
    assert variable_values(r.gw) == {"job": ["forecast-bpf"], "instance": [METRICS]}
    for title, expr in panel_exprs():
        result = promql(r.gw, expr)
        if not result:
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    pps = promql(r.gw, 'sum(rate(forecast_sa_packets_total{direction="lan_to_sa"}[10s]))')
    assert float(pps[0]["value"][1]) > 0

    if DOCS_OUT:
        _save_ranges(r.gw, Path(DOCS_OUT))

    # A CHILD_SA rekey keeps c1's series: same labels, counting on (its unique id changed).
    def c1_series(text: str) -> list[str]:
        return [
            ln
            for ln in text.splitlines()
            if ln.startswith("forecast_sa_packets_total{")
            and 'remote_id="c1@forecast.lab"' in ln
            and 'direction="lan_to_sa"' in ln
        ]

    (before_rekey,) = c1_series(http_get(r.gw, f"http://{METRICS}/metrics"))
    uid = next(s for s in r.state()["slots"].values() if s["remote_id"].startswith("c1@"))
    r.lab.rekey_child("c1")
    r.wait(
        "c1's rekey",
        lambda s: any(
            v["remote_id"].startswith("c1@") and v["unique_id"] != uid["unique_id"]
            for v in s["slots"].values()
        ),
    )
    (after_rekey,) = c1_series(http_get(r.gw, f"http://{METRICS}/metrics"))
    assert after_rekey == before_rekey  # same series, same count (no traffic meanwhile)

    # A gone SA's series disappear from the next scrape.
    r.lab.disconnect("c2")
    r.wait("c2 gone", lambda s: len(s["slots"]) == 1)
    after = http_get(r.gw, f"http://{METRICS}/metrics")
    assert 'remote_id="c2@forecast.lab"' not in after
    assert "forecast_sas 1.0" in after


def _save_ranges(ns: str, out: Path) -> None:
    """Range data of every panel, for the dashboard rendering in docs/."""
    out.mkdir(parents=True, exist_ok=True)
    end = time.time()
    panels = []
    for title, expr in panel_exprs():
        q = urllib.parse.urlencode(
            {
                "query": expr,
                "start": str(end - 60),
                "end": str(end),
                "step": "1",
            }
        )
        doc = json.loads(http_get(ns, f"http://{PROM}/api/v1/query_range?{q}"))
        panels.append({"title": title, "expr": expr, "result": doc["data"]["result"]})
    (out / "dashboard-ranges.json").write_text(json.dumps(panels, indent=1))


def test_status_watch_in_a_real_terminal(running: Running, tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.fail("tmux missing: run `make setup`", pytrace=False)
    running.lab.connect_all()
    running.wait("two SAs", lambda s: len(s["slots"]) == 2)
    session = f"fcwatch-{secrets.token_hex(3)}"
    cmd = (
        f"{sys.executable} -m forecast status --watch --interval 0.5 --config "
        f"{running.cfg_path}; sleep 30"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "20", cmd], check=True
    )

    def screen() -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-t", session, "-p"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def wait_for(pattern: str, seconds: float = 20) -> str:
        deadline = time.monotonic() + seconds
        text = ""
        while time.monotonic() < deadline:
            text = screen()
            if re.search(pattern, text, re.M):
                return text
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} never showed:\n{text}")

    lan = running.lab.topology.lan_host.netns
    sender = threading.Thread(
        target=traffic.send, args=(lan, GROUP, 1900, "watch", 400), kwargs={"iface": "eth0"}
    )
    try:
        wait_for(r"c1@forecast\.lab")
        sender.start()
        # A non-zero LAN>SA rate while the multicast flows...
        busy = wait_for(r"c1@forecast\.lab.*\s[1-9][\d.]*K?/s \d")
        sender.join(timeout=60)
        # ...back to zero once it stops; totals stay.
        idle = wait_for(r"c1@forecast\.lab.*\s0/s (?!0/)\d")
        assert "forecast-bpf status" in busy and "Ctrl-C to quit" in busy
        if DOCS_OUT:
            Path(DOCS_OUT).mkdir(parents=True, exist_ok=True)
            (Path(DOCS_OUT) / "status-watch.txt").write_text(busy)
        assert "total" in idle
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)


def test_ready_only_after_programs_attached_and_snapshot_applied(
    run_prefix: str, tmp_path: Path
) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
    gen = start_running(run_prefix, tmp_path, env=env, charon_down=True)
    running = next(gen)
    messages: list[str] = []

    def drain(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())

    try:
        gw_eth1 = netns.ifindex(running.gw, "eth1")
        # Set-up completes (filters attached) but charon is down: no READY, only STATUS.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not tc.bpf_filters(gw_eth1, netns=running.gw):
            drain(0.2)
        assert tc.bpf_filters(gw_eth1, netns=running.gw), running.log.read_text()
        drain(3)
        assert not any("READY=1" in m for m in messages), messages
        assert any("retrying" in m for m in messages if m.startswith("STATUS=")), messages
        assert any(m == "WATCHDOG=1" for m in messages), messages  # alive while it waits

        # charon comes back: the snapshot is applied, then READY=1.
        gw_charon = running.lab.charons["gw"]
        gw_charon.start()
        running.lab.load_gateway()
        running.lab.connect("c1")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("READY=1" in m for m in messages):
            drain(0.2)
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=" in ready and "VICI connected" in ready
        assert running.state()["vici_connected"]
        messages.clear()
        drain(2)
        assert messages.count("WATCHDOG=1") >= 2, messages  # every 0.5 s
        running.proc.send_signal(15)
        running.proc.wait(timeout=30)
        drain(0.5)
        assert any(m.startswith("STOPPING=1") for m in messages), messages
    finally:
        next(gen, None)
        sock.close()
