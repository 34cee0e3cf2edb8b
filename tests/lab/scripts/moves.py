"""Lab script: clients that move, with forecast-bpf's daemon, real XFRM and real ESP.

Run in a lab with --gateway-mode forecast-bpf --clients 2 --nat c2 --no-set-mark-in: c2 sits
behind its own NAT router (UDP-encapsulated ESP, a random outer port per mapping); the gateway's
children lack set_mark_in, so what a client sends is marked by the daemon's inbound MARK rule
alone: a rule left on an old address or port drops that client's traffic (its decrypted
packets miss the marked inbound policy). Extra argument: the netfilter back end.

1. Both ways through the NAT: LAN -> clients, c2 -> LAN and c1 (reinject), c1 -> c2.
2. c2's NAT router forgets its mapping (a new outer port) while the LAN and c2 send to each
   other at 100 packets/s: the gateway's kernel sees ESP from the new port, charon moves the
   IKE_SA (ike-update), the daemon moves c2's inbound rule. Copies lost across it, counted.
3. c1 moves (MOBIKE: its address changes under the IKE_SA): the same, measured.
Prints one RESULT line per check; exits 1 on failure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from forecast import netfilter
from forecast_lab import checks, ipsec_state, netns, traffic
from forecast_lab.checks import CheckResult
from forecast_lab.daemon_run import LabDaemon
from forecast_lab.topology import Host, Topology

topo = Topology.load(os.environ["FORECAST_LAB_TOPOLOGY"])
BACKEND = sys.argv[1] if len(sys.argv) > 1 else "auto"
RATE, SECONDS, CHANGE_AT = 100, 5.0, 1.5
COUNT = int(RATE * SECONDS)
results: list[CheckResult] = []


def report(result: CheckResult) -> None:
    results.append(result)
    print("RESULT " + json.dumps(result.as_dict()), flush=True)


def gateway_view(client: Host) -> dict[str, str]:
    """The gateway's IKE_SA with `client`: its outer address and port, as charon has it."""
    for child in ipsec_state.child_sas(topo.gateway.vici_socket):
        if child["remote-id"].startswith(client.name + "@") and child["state"] == "INSTALLED":
            return {k: child[f"ike-{k}"] for k in ("remote-host", "remote-port", "nat-any")}
    raise RuntimeError(f"no CHILD_SA of {client.name} at the gateway")


def inbound_rules(address: str) -> list[str]:
    """Our rules that match `address` as the source (either back end's spelling)."""
    return [
        line
        for held in netfilter.holding()
        for line in held.current()
        if f"-s {address}/32 " in line or f"ip saddr {address} " in line
    ]


def xfrm_errors(ns: str) -> dict[str, int]:
    """The kernel's IPsec error counters in `ns` (/proc/net/xfrm_stat), the non-zero ones."""
    text = netns.run(["cat", "/proc/net/xfrm_stat"], netns=ns).stdout
    return {k: int(v) for k, v in (line.split() for line in text.splitlines()) if int(v)}


def across(what: str, sender: Host, change: Any) -> CheckResult:
    """The LAN and `sender` send to each other (and the other client listens) at RATE while
    `change` happens CHANGE_AT seconds in; what each receiver missed, per direction."""
    slug = "-".join(what.split())  # a tag is one word: receivers split "<tag> <seq>"
    lan, tag_lan, tag_client = topo.lan_host, f"lan-{slug}", f"{sender.name}-{slug}"
    receivers = {
        h.name: traffic.Receiver(h.netns, checks.SSDP_PORT, [checks.SSDP_GROUP], wait=False)
        for h in (*topo.clients, lan)
    }
    for r in receivers.values():
        r.wait_ready()
    senders = [
        traffic.send(
            lan.netns,
            checks.SSDP_GROUP,
            checks.SSDP_PORT,
            tag_lan,
            COUNT,
            iface="eth0",
            interval=1 / RATE,
            background=True,
        ),
        traffic.send(
            sender.netns,
            checks.SSDP_GROUP,
            checks.SSDP_PORT,
            tag_client,
            COUNT,
            src=sender.virtual_ip,
            iface="eth0",
            interval=1 / RATE,
            background=True,
        ),
    ]
    time.sleep(CHANGE_AT)
    errors_before = {h.name: xfrm_errors(h.netns) for h in (topo.gateway, sender)}
    change()
    refused = []
    for proc in senders:
        assert proc is not None
        _out, err = proc.communicate(timeout=SECONDS * 4 + 30)
        refused += [line for line in err.splitlines() if line.startswith("send:")]
    time.sleep(1.0)
    got = {name: r.stop() for name, r in receivers.items()}
    flows = {f"lan -> {c.name}": got[c.name].for_tag(tag_lan) for c in topo.clients} | {
        f"{sender.name} -> lan": got["lan"].for_tag(tag_client),
        **{
            f"{sender.name} -> {c.name}": got[c.name].for_tag(tag_client)
            for c in topo.clients
            if c.name != sender.name
        },
    }
    detail: dict[str, Any] = {}
    ok = True
    for flow, seqs in flows.items():
        lost = COUNT - len(seqs)
        twice = sum(1 for n in seqs.values() if n > 1)
        # Resolution 1/RATE: the longest run of missing sequence numbers is the interruption.
        run = longest = 0
        for seq in range(COUNT):
            run = run + 1 if seq not in seqs else 0
            longest = max(longest, run)
        detail[flow] = {
            "lost": lost,
            "duplicates": twice,
            "interruption_ms": round(longest * 1000 / RATE),
        }
        ok &= twice == 0 and longest * 1000 / RATE < 1000  # forwarding again within a second
    echo = got[sender.name].for_tag(tag_client)
    detail["echo to the sender"] = sum(echo.values())
    detail["sends refused"] = refused  # by the sender's own kernel, while its path was rebuilt
    # Where packets were refused meanwhile, if anywhere: the kernel's IPsec error counters.
    detail["xfrm errors"] = {
        h.name: {
            k: v - errors_before[h.name].get(k, 0)
            for k, v in xfrm_errors(h.netns).items()
            if v != errors_before[h.name].get(k, 0)
        }
        for h in (topo.gateway, sender)
    }
    ok &= not echo
    return CheckResult(
        f"{what}: forwarding both ways is back within a second, no duplicate", ok, detail
    )


daemon = LabDaemon(
    topo,
    reinject=["rw"],
    groups=[checks.SSDP_GROUP, "224.0.0.251"],
    extra=[f"netfilter: {BACKEND}", "storm_guard: off"],
)
c1, c2 = topo.host("c1"), topo.host("c2")
try:
    daemon.start()
    used = [held.detail for held in netfilter.holding()]
    report(CheckResult(f"the daemon's rules are in {BACKEND}", len(used) == 1, {"in": used}))

    # -- 1. both ways through the NAT --------------------------------------------------------
    before = gateway_view(c2)
    report(
        CheckResult(
            "c2 is seen from its NAT router's address, UDP-encapsulated, port 40000-40999",
            before["remote-host"] == c2.nat_addr
            and before["nat-any"] == "yes"
            and 40000 <= int(before["remote-port"]) <= 40999,
            before,
        )
    )
    rules = inbound_rules(c2.nat_addr)
    report(
        CheckResult(
            "c2's inbound rule matches the NAT router's address and port",
            len(rules) == 1 and before["remote-port"] in rules[0],
            {"rules": rules},
        )
    )
    names = {c.name for c in topo.clients}
    report(checks.lan_to_clients(topo, checks.SSDP_GROUP, names))
    report(checks.client_to_others(topo, "c2", checks.SSDP_GROUP, {"c1"}, expect_lan=True))
    report(checks.client_to_others(topo, "c1", checks.SSDP_GROUP, {"c2"}, expect_lan=True))

    # -- 2. a new NAT mapping -----------------------------------------------------------------
    report(across("new NAT mapping of c2", c2, lambda: topo.renew_nat_mapping(c2)))
    after = gateway_view(c2)
    rules = inbound_rules(c2.nat_addr)
    report(
        CheckResult(
            "c2's new outer port: charon moved the IKE_SA, the daemon its inbound rule",
            after["remote-port"] != before["remote-port"]
            and len(rules) == 1
            and after["remote-port"] in rules[0]
            and "SA moved: rw/rw" in daemon.log_tail(100_000),
            {"before": before, "after": after, "rules": rules},
        )
    )

    # -- 3. c1 moves (MOBIKE) -----------------------------------------------------------------
    old_addr, new_addr = c1.wan_addr, "192.168.0.151"

    def move_c1() -> None:
        # Without promote_secondaries, removing the primary address would take the new one too.
        netns.run(["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"], netns=c1.netns)
        netns.run(["ip", "addr", "add", f"{new_addr}/24", "dev", "eth0"], netns=c1.netns)
        netns.run(["ip", "addr", "del", f"{old_addr}/24", "dev", "eth0"], netns=c1.netns)

    report(across("MOBIKE move of c1", c1, move_c1))
    view = gateway_view(c1)
    report(
        CheckResult(
            "c1's new address: its inbound rule moved with it",
            view["remote-host"] == new_addr
            and len(inbound_rules(new_addr)) == 1
            and not inbound_rules(old_addr),
            {"gateway": view, "new": inbound_rules(new_addr), "old": inbound_rules(old_addr)},
        )
    )
finally:
    left = daemon.stop()
report(CheckResult("stopping the daemon leaves nothing behind", LabDaemon.clean(left), left))
if not all(r.ok for r in results):
    print(daemon.log_tail(), flush=True)
sys.exit(0 if all(r.ok for r in results) else 1)
