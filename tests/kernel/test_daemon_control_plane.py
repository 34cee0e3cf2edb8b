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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forecast import tc
from forecast.datapath import program_digest
from forecast_lab import netns
from forecast_lab.conns import GatewayMode
from forecast_lab.lab import Lab, LabOptions
from tests.kernel.daemon_fixture import DAEMON_PYTHON, IF_ID, Running, start_running


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


# How each back end prints (hook, match, mark): the same rules, two spellings.
SPELLING = {
    "iptables": {
        "PREROUTING": "-A FORECAST-PRE ",
        "OUTPUT": "-A FORECAST-OUT ",
        "dst": "-d {}/32 ",
        "dst6": "-d {}/128 ",
        "src": "-s {}/32 ",
        "natt": "--sport 4500 --dport 4500",
        "mark": "--set-xmark {:#x}/0xffffffff",
    },
    "nftables": {
        "PREROUTING": "prerouting ",
        "OUTPUT": "output ",
        "dst": "ip daddr {} ",
        "dst6": "ip6 daddr {} ",
        "src": "ip saddr {} ",
        "natt": "udp sport 4500 udp dport 4500",
        "mark": "meta mark set {:#010x}",
    },
}


def _rule_lines(lines: list[str]) -> list[str]:
    """The rules among what Running.rules() lists (it also has iptables' chains and jumps)."""
    return [ln for ln in lines if ln.startswith(("-A FORECAST-", "prerouting ", "output "))]


def _backend_of(line: str) -> str:
    return "iptables" if line.startswith("-A FORECAST-") else "nftables"


def _has_rule(rules: list[str], backend: str, hook: str, *parts: str) -> bool:
    words = SPELLING[backend]
    return any(r.startswith(words[hook]) and all(p in r for p in parts) for r in rules)


@pytest.fixture(params=["nftables", "iptables"])
def running_on(
    request: pytest.FixtureRequest, run_prefix: str, tmp_path: Path
) -> Iterator[tuple[Running, str]]:
    backend = str(request.param)
    for r in start_running(run_prefix, tmp_path, extra_config=f"netfilter: {backend}\n", ipv6=True):
        yield r, backend


def test_connect_rekey_disconnect_stop(running_on: tuple[Running, str]) -> None:
    """The same scenario with either netfilter back end; dual-stack clients, so the IPv6
    virtual IPs' routes and rules and the IPv6 selectors go the same way as the IPv4 ones."""
    running, backend = running_on
    words = SPELLING[backend]
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
    for group6 in ("ff02::fb", "ff02::1:3", "ff02::c"):  # groups6: MLD
        assert f"inet6 {group6}" in maddr, maddr

    # -- connect: slot, rules, route -------------------------------------------------------
    lab.connect_all()
    state = running.wait("two SAs", lambda s: len(s["slots"]) == 2)
    c1, c2 = (lab.topology.host(n) for n in ("c1", "c2"))
    s1 = _slot_of(state, "c1@forecast.lab")
    s2 = _slot_of(state, "c2@forecast.lab")
    assert s1["virtual_ips"] == [c1.virtual_ip, c1.virtual_ip6] and s1["reinject"]
    assert s1["mark_in"] != s2["mark_in"] and s1["slot"] != s2["slot"]
    assert "224.0.0.0/4" in s1["selectors"] and "ff02::/16" in s1["selectors"]
    rules = running.rules()
    for host, s in ((c1, s1), (c2, s2)):
        mark, vip = words["mark"].format(s["mark_in"]), words["dst"].format(host.virtual_ip)
        assert _has_rule(rules, backend, "PREROUTING", vip, mark), rules
        assert _has_rule(rules, backend, "OUTPUT", vip, mark), rules
        # libipsec forces UDP encapsulation: the inbound rule matches the NAT-T ports.
        peer = words["src"].format(host.wan_addr)
        assert _has_rule(rules, backend, "PREROUTING", peer, words["natt"], mark), rules
        assert re.search(rf"^{re.escape(host.virtual_ip)} dev xfs0 ", running.routes(), re.M)
        vip6 = words["dst6"].format(host.virtual_ip6)
        assert _has_rule(rules, backend, "PREROUTING", vip6, mark), rules
        assert _has_rule(rules, backend, "OUTPUT", vip6, mark), rules
        assert re.search(rf"^{re.escape(host.virtual_ip6)} dev xfs0 ", running.routes(), re.M)
    assert len(_rule_lines(rules)) == 10  # nothing in the other back end

    # -- status reads the live maps --------------------------------------------------------
    out = forecast_cli("status", running.cfg_path, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["schema"] == 1 and len(doc["sas"]) == 2
    assert {sa["remote_id"] for sa in doc["sas"]} == {"c1@forecast.lab", "c2@forecast.lab"}
    assert doc["daemon"]["netfilter"].startswith(backend), doc["daemon"]
    # libipsec forces UDP encapsulation: each client is seen at its address, port 4500.
    assert {(sa["remote_host"], sa["remote_port"], sa["udp_encap"]) for sa in doc["sas"]} == {
        (c1.wan_addr, 4500, True),
        (c2.wan_addr, 4500, True),
    }
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
    for vip in (c2.virtual_ip, c2.virtual_ip6):
        assert not any(vip in r for r in running.rules())
        assert vip not in running.routes()
    assert c1.virtual_ip in running.routes() and c1.virtual_ip6 in running.routes()

    # -- charon restarts: the daemon reconnects and takes a fresh snapshot -----------------
    gw_charon = lab.charons["gw"]
    gw_charon.stop()
    running.wait("VICI gone", lambda s: not s["vici_connected"])
    # Meanwhile someone adds a rule of their own to ours: the read-back at the reconnect
    # finds it (one listing in nftables) and the rules are written whole again.
    foreign = {
        "iptables": ["iptables", "-t", "mangle", "-A", "FORECAST-PRE", "-j", "ACCEPT"],
        "nftables": ["nft", "add rule inet forecast_bpf prerouting accept"],
    }[backend]
    netns.run(foreign, netns=running.gw)
    assert any(r.endswith(("-j ACCEPT", "accept")) for r in _rule_lines(running.rules()))
    gw_charon.start()
    lab.load_gateway()
    running.wait("reconnected, no SAs", lambda s: s["vici_connected"] and not s["slots"])
    assert not any(c1.virtual_ip in r for r in running.rules())
    assert _rule_lines(running.rules()) == []  # the foreign rule went with the rewrite
    assert "our MARK rules were changed by someone else: rewriting them" in running.log.read_text()
    lab.connect("c1")
    running.wait("c1 back after the restart", lambda s: len(s["slots"]) == 1)
    before = _rule_lines(running.rules())

    # -- the other back end after a crash and restart: its rules in, ours of before out ----
    running.proc.kill()
    running.proc.wait(timeout=10)
    other = "iptables" if backend == "nftables" else "nftables"
    text = running.cfg_path.read_text().replace(f"netfilter: {backend}", f"netfilter: {other}")
    running.cfg_path.write_text(text)
    running.spawn()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = _rule_lines(running.rules())
        if len(now) == 5 and {_backend_of(r) for r in now} == {other}:
            break
        time.sleep(0.2)
    switched = _rule_lines(running.rules())
    assert len(switched) == len(before) == 5, (before, switched)
    assert not set(switched) & set(before)
    assert f"removed the MARK rules left in {backend}" in running.log.read_text()
    backend, words = other, SPELLING[other]

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
    assert re.search(
        {
            "iptables": r"netfilter back end: iptables \((nf_tables|legacy)\), chains",
            "nftables": r"netfilter back end: nftables, table inet forecast_bpf",
        }[backend],
        log,
    )
    assert "VICI reconnected" in log
    assert os.path.exists(running.lab.topology.gateway.vici_socket)  # charon itself untouched


def test_check_tells_what_each_child_lacks(run_prefix: str, tmp_path: Path) -> None:
    """`check` against live SAs: the seed's config is ready on the local output path (and,
    with that path turned off, lacks the if_id); forecast-bpf's has the if_id."""
    for i, (mode, extra, want_rc, want) in enumerate(
        (
            (GatewayMode.SEED, "", 0, "OK       rw/rw #1 (c1@forecast.lab"),
            (GatewayMode.SEED, "mark_only_sas: ignore\n", 1, "set if_id_in = if_id_out = 42"),
            (GatewayMode.FORECAST_BPF, "", 1, "set set_mark_in = %same"),
        )
    ):
        opts = LabOptions(
            clients=1, libipsec=True, mode=mode, if_id=IF_ID, prefix=f"{run_prefix}k{i}"
        )
        with Lab(opts) as lab:
            cfg = tmp_path / f"{i}.yaml"
            cfg.write_text(
                f"vici_socket: {lab.topology.gateway.vici_socket}\nxfrm: {{if_id: {IF_ID}}}\n"
                + extra
            )
            out = forecast_cli("check", cfg, netns=lab.topology.gateway.netns)
        assert out.returncode == want_rc, out.stdout + out.stderr
        assert want in out.stdout
        if want_rc:
            assert "MISSING  rw/rw #1 (c1@forecast.lab" in out.stdout
        if mode is GatewayMode.SEED and not extra:
            # the plugin's configuration needs no set_mark_in: the ESP rule marks
            assert "(path: local-out)" in out.stdout and "set_mark_in" not in out.stdout
            assert "note: served by the local output path" in out.stdout
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


def test_a_client_that_moves_keeps_its_inbound_rule(
    running_on: tuple[Running, str], figures: Callable[[str], None]
) -> None:
    """MOBIKE: c1's address changes under its IKE_SA; charon's ike-update moves the inbound
    rule to the new address (this kernel's libipsec then also rekeys the CHILD_SA)."""
    running, backend = running_on
    words = SPELLING[backend]
    lab = running.lab
    lab.connect("c1")
    running.wait("c1's SA", lambda s: len(s["slots"]) == 1)
    c1 = lab.topology.host("c1")
    old, new = words["src"].format(c1.wan_addr), words["src"].format("192.168.0.201")
    assert _has_rule(running.rules(), backend, "PREROUTING", old, words["natt"])
    # Without promote_secondaries, removing the primary address would take the new one too.
    netns.run(["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"], netns=c1.netns)
    netns.run(["ip", "addr", "add", "192.168.0.201/24", "dev", "eth0"], netns=c1.netns)
    moved_at = time.monotonic()
    netns.run(["ip", "addr", "del", f"{c1.wan_addr}/24", "dev", "eth0"], netns=c1.netns)
    while time.monotonic() < moved_at + 10:
        if _has_rule(running.rules(), backend, "PREROUTING", new):
            break
        time.sleep(0.02)
    took = time.monotonic() - moved_at
    rules = running.rules()
    assert _has_rule(rules, backend, "PREROUTING", new, words["natt"]), rules
    assert not _has_rule(rules, backend, "PREROUTING", old), rules
    log = running.log.read_text()
    assert "SA moved: rw/rw" in log and "-> 192.168.0.201:4500" in log, log[-2000:]
    running.wait(
        "status at the new address",
        lambda s: [v["remote_host"] for v in s["slots"].values()] == ["192.168.0.201"],
    )
    figures(f"{backend}: MOBIKE move, address change -> inbound rule moved in {took:.2f} s")
