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
    `reinject`: broadcast skips c3, c1's multicast reaches c3 but not c2. Dual stack: every
    multicast check is made over IPv6 too (mDNS ff02::fb), with IPv6 virtual IPs."""
    run = lab.script(
        "daemon.py",
        "--gateway-mode",
        "forecast-bpf",
        "--clients",
        "3",
        "--no-broadcast",
        "c3",
        "--ipv6",
        script_args=("rw-nobcast",),
    )
    _all_ok(run)
    assert len(run.results) == 22
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
    # IPv6, real ESP: the LAN's mDNS to every client, c1's to the LAN and c3 only, unicast both
    # ways, a group outside groups6 to nobody, and the per-family totals.
    mc6 = run.result("LAN -> ff02::fb reaches ['c1', 'c2', 'c3']")["detail"]
    assert all(mc6[c]["received"] == COUNT for c in ("c1", "c2", "c3"))
    c1_6 = run.result("c1 -> ff02::fb reaches ['c3', 'lan']")["detail"]
    assert c1_6["lan"]["received"] == c1_6["c3"]["received"] == COUNT
    assert c1_6["c2"]["received"] == 0 and c1_6["c1"]["received"] == 0
    assert all(v["received"] == 0 for v in run.result("LAN -> ff02::1:5")["detail"].values())
    assert run.result("unicast VIP <-> LAN over ESP (IPv6)")["ok"]
    fam = run.result("status --json: the IPv6 copies")["detail"]
    assert (
        fam["grew"]["ipv6"]
        == fam["want_ipv6"]
        == {
            "lan_to_sa": 3 * COUNT,
            "sa_to_lan": COUNT,
            "sa_to_sa": COUNT,
        }
    )


def test_mark_only_seed_config(lab: LabRunner) -> None:
    """The seed's swanctl.conf unchanged (marks, no if_id, no set_mark_in): every SA on the
    local output path, the same forwarding as the XFRM-interface path, copies queued during a
    restart sent by the next daemon, an SA going under load, and nothing in clear on the WAN
    the whole time (tests/lab/scripts/mark_only.py)."""
    run = lab.script(
        "mark_only.py",
        "--gateway-mode",
        "seed",
        "--clients",
        "3",
        "--no-broadcast",
        "c3",
        script_args=("rw-nobcast",),
    )
    _all_ok(run)
    assert len(run.results) == 13
    mc = run.result("LAN -> 239.255.255.250 reaches ['c1', 'c2', 'c3']")["detail"]
    assert all(mc[c]["received"] == COUNT for c in ("c1", "c2", "c3"))
    bc = run.result("LAN -> 10.1.255.255")["detail"]
    assert bc["c1"]["received"] == bc["c2"]["received"] == COUNT and bc["c3"]["received"] == 0
    c1 = run.result("c1 -> 239.255.255.250 reaches ['c3', 'lan']")["detail"]
    assert c1["lan"]["received"] == c1["c3"]["received"] == COUNT
    assert c1["c2"]["received"] == 0 and c1["c1"]["received"] == 0
    sent = run.result("status --json counters equal the traffic")["detail"]
    assert sent["local_out"]["sent"] == sent["copies"] > 0
    wan = run.result("nothing left the WAN device in clear")["detail"]
    assert wan["clear"] == 0 and wan["encrypted"] > 0
