"""`forecast-bpf lab demo`, the part that runs on the lab's gateway (in its namespace).

Default: forecast-bpf's daemon forwards; with --reference-plugin, strongSwan's forecast plugin
does, for comparison. Either way: tunnels, the scenario's results, and (daemon) its status.
"""

from __future__ import annotations

import os
import sys

from forecast_lab import checks, conns, ipsec_state
from forecast_lab.checks import CheckResult
from forecast_lab.daemon_run import LabDaemon
from forecast_lab.topology import Topology


def _print_sas(topo: Topology) -> None:
    print("\nCHILD_SAs on the gateway:")
    for c in ipsec_state.child_sas(topo.gateway.vici_socket):
        print(
            f"  {c['ike']}/{c['name']} #{c['uniqueid']}  {c['remote-id']}  vip "
            f"{c['remote-vips']}  mark {c.get('mark-in', '-')}  if_id "
            f"{c.get('if-id-in', '-')}  spi-in {c['spi-in']}  ts {c['remote-ts']}"
        )


def _print_results(results: list[CheckResult]) -> int:
    for r in results:
        print("  " + r.line())
    passed = sum(r.ok for r in results)
    print(f"\n{passed} passed, {len(results) - passed} failed", flush=True)
    return 0 if passed == len(results) else 1


def scenario(topo: Topology, ipv6: bool) -> list[CheckResult]:
    """The IPv4 checks; with `ipv6` (a dual-stack lab, forecast-bpf forwarding) the same over
    IPv6, mDNS's group standing in for SSDP's."""
    names = {c.name for c in topo.clients}
    first = topo.clients[0].name
    results = [
        checks.unicast(topo),
        checks.lan_to_clients(topo, checks.SSDP_GROUP, names),
        checks.lan_to_clients(topo, topo.lan_broadcast, names),
        checks.client_to_others(topo, first, checks.SSDP_GROUP, names - {first}, expect_lan=True),
    ]
    if ipv6:
        results += [
            checks.unicast(topo, version=6),
            checks.lan_to_clients(topo, checks.MDNS_GROUP6, names),
            checks.client_to_others(
                topo, first, checks.MDNS_GROUP6, names - {first}, expect_lan=True
            ),
        ]
    return results


def main() -> int:
    topo = Topology.load(os.environ["FORECAST_LAB_TOPOLOGY"])
    mode = topo.extra["gateway_mode"]
    _print_sas(topo)
    if mode == "reference-plugin":
        print(f"\nscenario (strongSwan's forecast plugin, kernel {os.uname().release}):")
        if topo.lan_net6:
            print("  (IPv6 multicast not checked: strongSwan's plugin forwards IPv4 only)")
        return _print_results(scenario(topo, ipv6=False))
    daemon = LabDaemon(topo, reinject=[conns.GATEWAY_CHILD, conns.GATEWAY_CHILD_NO_BROADCAST])
    try:
        seconds = daemon.start()
        print(
            f"\nforecast-bpf daemon up in {seconds:.1f} s (programs compiled and attached, "
            f"{len(topo.clients)} SAs in the data path)"
        )
        print(f"\nscenario (forecast-bpf, kernel {os.uname().release}):")
        results = scenario(topo, ipv6=bool(topo.lan_net6))
        rc = _print_results(results)
        print("\n$ forecast-bpf status")
        print(daemon.cli("status").stdout)
    finally:
        left = daemon.stop()
    if LabDaemon.clean(left):
        print("daemon stopped: no rule, route, filter, interface or pin left behind")
        return rc
    print(f"daemon stopped, but left: {left}\n{daemon.log_tail()}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
