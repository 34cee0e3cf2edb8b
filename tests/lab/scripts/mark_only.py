"""Lab script: the seed's unchanged configuration (mark_in = mark_out = %unique, no if_id, no
set_mark_in) served by forecast-bpf's local output path, real XFRM and ESP.

Run in a lab with --gateway-mode seed. Arguments: the CHILD_SA config names to put in
`reinject`. A capture on the gateway's WAN side runs the whole time: nothing may leave in
clear, including while an SA goes away under load. Prints one RESULT line per check; exits 1
on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from forecast import netfilter
from forecast_lab import checks, faults, ipsec_state, traffic
from forecast_lab.checks import CheckResult
from forecast_lab.daemon_run import LabDaemon
from forecast_lab.topology import Topology

topo = Topology.load(os.environ["FORECAST_LAB_TOPOLOGY"])
REINJECT = sys.argv[1:]
LOAD = 2000  # packets at 100/s: the SA goes while they flow (a CLI call takes seconds under TCG)
results: list[CheckResult] = []


def report(result: CheckResult) -> None:
    results.append(result)
    print("RESULT " + json.dumps(result.as_dict()), flush=True)


def local_out(daemon: LabDaemon) -> dict[str, int]:
    return dict(daemon.status_json()["local_out"] or {})


def listen_on_every_client() -> dict[str, traffic.Receiver]:
    """A receiver for the SSDP group on each client, started together, then awaited."""
    receivers = {
        c.name: traffic.Receiver(c.netns, checks.SSDP_PORT, [checks.SSDP_GROUP], wait=False)
        for c in topo.clients
    }
    for r in receivers.values():
        r.wait_ready()
    return receivers


def lan_to_sa(daemon: LabDaemon, client: str) -> int:
    for sa in daemon.status_json()["sas"]:
        if sa["remote_id"].split("@")[0] == client:
            return int(sa["counters"]["lan_to_sa"]["packets"])
    return 0


daemon = LabDaemon(topo, reinject=REINJECT, groups=[checks.SSDP_GROUP, "224.0.0.251"])
names = {c.name for c in topo.clients}
first, last = topo.clients[0], topo.clients[-1]
work = Path(f"/tmp/{topo.prefix}-mark-only")
work.mkdir(exist_ok=True)
capture = faults.WanCapture(topo, work)
try:
    seconds = daemon.start()
    report(CheckResult("daemon up with mark-only SAs", True, {"seconds": round(seconds, 1)}))
    check = daemon.cli("check")
    report(
        CheckResult(
            "check: every mark-only child is ready, on the local-out path",
            check.returncode == 0 and check.stdout.count("(path: local-out)") == len(names),
            {"output": check.stdout.splitlines()},
        )
    )
    doc = daemon.status_json()
    report(
        CheckResult(
            "status: every SA on the local-out path, none ignored",
            [sa["path"] for sa in doc["sas"]] == ["local-out"] * len(names) and not doc["ignored"],
            {"paths": [sa["path"] for sa in doc["sas"]], "ignored": doc["ignored"]},
        )
    )
    rules = [line for held in netfilter.holding() for line in held.current()]
    guards = [line for line in rules if "DROP" in line.upper() and "mark" in line]
    vip_routes = subprocess.run(
        ["ip", "route", "show", "proto", "252"], capture_output=True, text=True, check=False
    ).stdout
    report(
        CheckResult(
            "one guard rule per SA, no route of ours (charon routes mark-only children)",
            len(guards) == len(names) and not vip_routes.strip(),
            {"guards": guards, "routes": vip_routes.splitlines()},
        )
    )

    # Who negotiated the LAN broadcast, who is reinjected: the gateway's own view of its SAs.
    bcast_clients, clients_of = checks.gateway_clients(topo)
    report(checks.lan_to_clients(topo, checks.SSDP_GROUP, names))
    report(checks.lan_to_clients(topo, topo.lan_broadcast, bcast_clients))
    reinjected = set().union(*(clients_of.get(name, set()) for name in REINJECT))
    others = reinjected - {first.name}
    report(checks.client_to_others(topo, first.name, checks.SSDP_GROUP, others, expect_lan=True))
    report(checks.unicast(topo))

    doc = daemon.status_json()
    count = checks.DEFAULT_COUNT
    want, got = checks.counters_after_scenario(doc, count, bcast_clients, first.name, others)
    sent = local_out(daemon)
    copies = sum(sum(v.values()) - v["sa_to_lan"] for v in want.values())
    report(
        CheckResult(
            "status --json counters equal the traffic; the daemon sent every copy",
            want == got
            and sent.get("sent") == copies
            and not any(n for k, n in sent.items() if k != "sent"),
            {"want": want, "got": got, "local_out": sent, "copies": copies},
        )
    )

    # Restart (a hand-over): copies the LAN sends while no daemon runs wait in the pinned queue
    # and the next daemon sends them: none lost.
    daemon.handover()
    tag = f"gap-{os.getpid()}"
    receivers = listen_on_every_client()
    traffic.send(topo.lan_host.netns, checks.SSDP_GROUP, checks.SSDP_PORT, tag, count, iface="eth0")
    t_restart = time.monotonic()
    daemon.start()
    restart_s = time.monotonic() - t_restart
    time.sleep(2.0)
    got_gap = {name: r.stop() for name, r in receivers.items()}
    report(
        CheckResult(
            "copies queued while no daemon ran are sent by the next one, each once",
            all(g.exactly_once(tag, count) for g in got_gap.values()),
            {
                "received": {n: g.total(tag) for n, g in got_gap.items()},
                "restart_s": round(restart_s, 1),
            },
        )
    )

    # An SA goes while the LAN sends: its copies stop, the others' go on, nothing in clear.
    tag = f"going-{os.getpid()}"
    receivers = listen_on_every_client()
    sender = traffic.send(
        topo.lan_host.netns,
        checks.SSDP_GROUP,
        checks.SSDP_PORT,
        tag,
        LOAD,
        iface="eth0",
        interval=0.01,
        background=True,
    )
    # Copies are flowing to it (its counter grows) when it goes.
    at_start = lan_to_sa(daemon, last.name)
    deadline = time.monotonic() + 60
    while lan_to_sa(daemon, last.name) < at_start + 50 and time.monotonic() < deadline:
        time.sleep(0.2)
    ipsec_state.command(last.vici_socket, "terminate", {"ike": "gw", "timeout": 5000})
    daemon.wait_state("the disconnect", lambda s: len(s["slots"]) == len(names) - 1)
    assert sender is not None
    sender.wait(timeout=300)
    time.sleep(1.0)
    got_going = {name: r.stop() for name, r in receivers.items()}
    stayed = names - {last.name}
    rules = [line for held in netfilter.holding() for line in held.current()]
    report(
        CheckResult(
            f"{last.name} goes under load: the others get every copy once, its guard goes",
            all(got_going[n].exactly_once(tag, LOAD) for n in stayed)
            and 50 <= got_going[last.name].total(tag) < LOAD
            and len([line for line in rules if "DROP" in line.upper()]) == len(stayed),
            {
                "received": {n: g.total(tag) for n, g in got_going.items()},
                "local_out": local_out(daemon),
            },
        )
    )
finally:
    left = daemon.stop()
    wan = capture.stop()
report(
    CheckResult(
        "nothing left the WAN device in clear (and the capture saw the ESP)",
        wan["clear"] == 0 and wan["encrypted"] > 0 and wan["dropped_by_kernel"] == 0,
        wan,
    )
)
report(CheckResult("stopping the daemon leaves nothing behind", LabDaemon.clean(left), left))
if not all(r.ok for r in results):
    print(daemon.log_tail(), flush=True)
sys.exit(0 if all(r.ok for r in results) else 1)
