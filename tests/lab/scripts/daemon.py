"""Lab script: forecast-bpf's daemon instead of strongSwan's plugin, real XFRM and ESP.

Run in a lab with --gateway-mode forecast-bpf. Arguments: the CHILD_SA config names to put in
`reinject` (none: no reinjection). Reinjection is decided per target's config, so a lab with
`--no-broadcast c3` and `rw-nobcast` here tests both sides at once: c3 gets other clients'
multicast, the clients on `rw` do not. Prints one RESULT line per check; exits 1 on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from forecast import netfilter
from forecast_lab import checks, ipsec_state
from forecast_lab.checks import CheckResult
from forecast_lab.daemon_run import LabDaemon
from forecast_lab.topology import Topology

topo = Topology.load(os.environ["FORECAST_LAB_TOPOLOGY"])
REINJECT = sys.argv[1:]
NOT_A_GROUP = "239.1.2.3"  # receivers join it; the daemon must not forward it
NOT_A_GROUP6 = "ff02::1:5"  # inside every SA's IPv6 selector, not in groups6
OSPF = "224.0.0.5"  # AllSPFRouters: no client may send it onto the LAN
results: list[CheckResult] = []


def report(result: CheckResult) -> None:
    results.append(result)
    print("RESULT " + json.dumps(result.as_dict()), flush=True)


# Not the default list: its 224.0.0.22 forwards the receivers' own IGMP reports too (rightly),
# which would blur the exact counter check below.
daemon = LabDaemon(topo, reinject=REINJECT, groups=[checks.SSDP_GROUP, "224.0.0.251"])
names = {c.name for c in topo.clients}
first, last = topo.clients[0], topo.clients[-1]
try:
    seconds = daemon.start()
    report(
        CheckResult(
            "daemon up: programs attached, every SA in the data path",
            True,
            {"seconds": round(seconds, 1)},
        )
    )
    check = daemon.cli("check")
    report(
        CheckResult(
            "check: every live child is ready",
            check.returncode == 0,
            {"output": check.stdout.splitlines()},
        )
    )

    # Who negotiated the LAN broadcast, who is reinjected: the gateway's own view of its SAs.
    bcast_clients, clients_of = checks.gateway_clients(topo)
    report(checks.lan_to_clients(topo, checks.SSDP_GROUP, names))
    report(checks.lan_to_clients(topo, topo.lan_broadcast, bcast_clients))
    report(checks.lan_to_clients(topo, NOT_A_GROUP, set()))
    reinjected = set().union(*(clients_of.get(name, set()) for name in REINJECT))
    others = reinjected - {first.name}
    report(checks.client_to_others(topo, first.name, checks.SSDP_GROUP, others, expect_lan=True))
    report(checks.unicast(topo))

    # Counters, as `status --json` reports them, equal what was sent and received.
    doc = daemon.status_json()
    count = checks.DEFAULT_COUNT
    want, got = checks.counters_after_scenario(doc, count, bcast_clients, first.name, others)
    report(
        CheckResult(
            "status --json counters equal the traffic",
            want == got,
            {"want": want, "got": got, "drops": doc["drops"]},
        )
    )

    if topo.lan_net6:
        # The same over IPv6 in a dual-stack lab: groups6 (the default, mDNS among them), IPv6
        # virtual IPs routed and marked, IPv6 selectors; its copies in the IPv6 totals only.
        before = daemon.status_json()["families"]
        report(checks.unicast(topo, version=6))
        report(checks.lan_to_clients(topo, checks.MDNS_GROUP6, names))
        report(checks.lan_to_clients(topo, NOT_A_GROUP6, set()))
        report(
            checks.client_to_others(topo, first.name, checks.MDNS_GROUP6, others, expect_lan=True)
        )
        after = daemon.status_json()["families"]
        grew = {
            family: {k: after[family][k]["packets"] - before[family][k]["packets"] for k in v}
            for family, v in after.items()
        }
        want6 = {
            "lan_to_sa": count * len(names),
            "sa_to_lan": count,
            "sa_to_sa": count * len(others),
        }
        report(
            CheckResult(
                "status --json: the IPv6 copies in the IPv6 totals, none in the IPv4 ones",
                grew["ipv6"] == want6 and not any(grew["ipv4"].values()),
                {"want_ipv6": want6, "grew": grew},
            )
        )

    # LAN protection: a client speaking OSPF reaches neither the LAN nor the other clients
    # (client_groups default to `groups`), and its SA's drop counters say so.
    report(checks.client_to_others(topo, first.name, OSPF, set(), expect_lan=False))
    first_sa = next(
        sa for sa in daemon.status_json()["sas"] if sa["remote_id"].startswith(first.name + "@")
    )
    report(
        CheckResult(
            f"{first.name}'s OSPF packets are counted as not forwarded, both ways",
            first_sa["drops"]["group_to_lan"] == count
            and first_sa["drops"]["group_to_sas"] == count,
            {"drops": first_sa["drops"]},
        )
    )

    # CHILD_SA rekey (client-initiated): same slot, new SPI, forwarding goes on.
    before = daemon.by_client()[first.name]
    ipsec_state.command(first.vici_socket, "rekey", {"child": "gw"})
    after = daemon.by_client(
        daemon.wait_state(
            "the rekeyed SPI",
            lambda s: daemon.by_client(s)[first.name]["spi_in"] != before["spi_in"],
        )
    )[first.name]
    report(
        CheckResult(
            "CHILD_SA rekey followed: same slot and mark, new SPI",
            after["mark_in"] == before["mark_in"],
            {"before": before["spi_in"], "after": after["spi_in"]},
        )
    )
    report(checks.lan_to_clients(topo, checks.SSDP_GROUP, names))
    # IKE rekey: the children move to the new IKE_SA; forwarding goes on.
    ipsec_state.command(first.vici_socket, "rekey", {"ike": "gw"})
    daemon.wait_state(
        "the IKE rekey", lambda s: daemon.by_client(s)[first.name]["ike_id"] != after["ike_id"]
    )
    report(checks.lan_to_clients(topo, checks.SSDP_GROUP, names))
    if topo.lan_net6:
        report(checks.lan_to_clients(topo, checks.MDNS_GROUP6, names))

    # Disconnect the last client: its slot, rules and route go; the others keep working.
    ipsec_state.command(last.vici_socket, "terminate", {"ike": "gw", "timeout": 5000})
    daemon.wait_state("the disconnect", lambda s: len(s["slots"]) == len(names) - 1)
    rules = [line for held in netfilter.holding() for line in held.current()]
    vips = [v for v in (last.virtual_ip, last.virtual_ip6) if v]
    leftover = [line for line in rules if any(v in line for v in vips)]
    routes = "".join(
        subprocess.run(
            ["ip", family, "route", "show", "proto", "252"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for family in ("-4", "-6")
    )
    report(
        CheckResult(
            f"disconnect of {last.name} removes its rules and routes",
            not leftover and not any(v in routes for v in vips),
            {"vips": vips, "rules": leftover, "routes": routes.splitlines()},
        )
    )
    report(checks.lan_to_clients(topo, checks.SSDP_GROUP, names - {last.name}))
finally:
    left = daemon.stop()
report(CheckResult("stopping the daemon leaves nothing behind", LabDaemon.clean(left), left))
if not all(r.ok for r in results):
    print(daemon.log_tail(), flush=True)
sys.exit(0 if all(r.ok for r in results) else 1)
