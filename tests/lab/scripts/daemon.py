"""Lab script: forecast-bpf's daemon instead of strongSwan's plugin, real XFRM and ESP.

Run in a lab with --gateway-mode forecast-bpf. Arguments: `reinject` or `no-reinject`.
Prints one RESULT line per check; exits 1 if any failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from forecast.lab import checks, inspect
from forecast.lab.checks import CheckResult
from forecast.lab.topology import Topology

topo = Topology.load(os.environ["FORECAST_LAB_TOPOLOGY"])
REINJECT = sys.argv[1:] == ["reinject"]
WORK = Path(f"/tmp/{topo.prefix}-daemon")
WORK.mkdir(exist_ok=True)
STATE = WORK / "state.json"
CONFIG = WORK / "forecast-bpf.yaml"
LOG = WORK / "daemon.log"
PIN_DIR = Path("/sys/fs/bpf/forecast-bpf")
NOT_A_GROUP = "239.1.2.3"  # receivers join it; the daemon must not forward it
results: list[CheckResult] = []


def report(result: CheckResult) -> None:
    results.append(result)
    print("RESULT " + json.dumps(result.as_dict()), flush=True)


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def state() -> dict[str, Any]:
    try:
        return dict(json.loads(STATE.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_state(what: str, pred: Any, seconds: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = state()
        if s and pred(s):
            return s
        if daemon.poll() is not None:
            break
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}; daemon log:\n{LOG.read_text()[-4000:]}")


def by_remote(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["remote_id"].split("@")[0]: v for v in s.get("slots", {}).values()}


def status_json() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "forecast", "status", "--json", "--config", str(CONFIG)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


CONFIG.write_text(
    f"interface: {topo.gw_lan_if}\n"
    f"reinject: {'[rw]' if REINJECT else '[]'}\n"
    # Not the default list: its 224.0.0.22 forwards the receivers' own IGMP reports too
    # (rightly), which would blur the exact counter check below.
    f"groups: [{checks.SSDP_GROUP}, 224.0.0.251]\n"
    f"xfrm: {{name: fcxfrm0, if_id: {topo.extra['if_id']}, dev: {topo.gw_wan_if}}}\n"
    f"vici_socket: {topo.gateway.vici_socket}\n"
    f"state_file: {STATE}\n"
    "log_level: info\n"
)
names = {c.name for c in topo.clients}
t0 = time.monotonic()
daemon = subprocess.Popen(
    [sys.executable, "-m", "forecast", "run", "--config", str(CONFIG)],
    stdout=LOG.open("w"),
    stderr=subprocess.STDOUT,
)
try:
    s = wait_state(
        "every SA in the data path",
        lambda s: s.get("vici_connected") and len(s["slots"]) == len(names),
    )
    report(
        CheckResult(
            "daemon up: programs attached, every SA in the data path",
            True,
            {"seconds": round(time.monotonic() - t0, 1)},
        )
    )

    # Who negotiated the LAN broadcast: the gateway's own view of the SAs.
    bcast_clients = {
        c["remote-id"].split("@")[0]
        for c in inspect.child_sas(topo.gateway.vici_socket)
        if f"{topo.lan_broadcast}/32" in c["remote-ts"].split()
    }
    mc = checks.lan_to_clients(topo, checks.SSDP_GROUP, names)
    report(mc)
    report(checks.lan_to_clients(topo, topo.lan_broadcast, bcast_clients))
    report(checks.lan_to_clients(topo, NOT_A_GROUP, set()))
    first = topo.clients[0].name
    others = names - {first} if REINJECT else set()
    report(checks.client_to_others(topo, first, checks.SSDP_GROUP, others, expect_lan=True))
    report(checks.unicast(topo))

    # Counters, as `status --json` reports them, equal what was sent and received.
    doc = status_json()
    count = checks.DEFAULT_COUNT
    want, got = {}, {}
    for sa in doc["sas"]:
        name = sa["remote_id"].split("@")[0]
        want[name] = {
            "lan_to_sa": count + (count if name in bcast_clients else 0),
            "sa_to_lan": count if name == first else 0,
            "sa_to_sa": count if name in others else 0,
        }
        got[name] = {k: v["packets"] for k, v in sa["counters"].items()}
    report(
        CheckResult(
            "status --json counters equal the traffic",
            want == got,
            {"want": want, "got": got, "drops": doc["drops"]},
        )
    )

    # CHILD_SA rekey (client-initiated): same slot, new SPI, forwarding goes on.
    before = by_remote(state())[first]
    inspect.command(topo.host(first).vici_socket, "rekey", {"child": "gw"})
    after = by_remote(
        wait_state("the rekeyed SPI", lambda s: by_remote(s)[first]["spi_in"] != before["spi_in"])
    )[first]
    report(
        CheckResult(
            "CHILD_SA rekey followed: same slot and mark, new SPI",
            after["mark_in"] == before["mark_in"],
            {"before": before["spi_in"], "after": after["spi_in"]},
        )
    )
    report(checks.lan_to_clients(topo, checks.SSDP_GROUP, names))
    # IKE rekey: the children move to the new IKE_SA; forwarding goes on.
    inspect.command(topo.host(first).vici_socket, "rekey", {"ike": "gw"})
    wait_state("the IKE rekey", lambda s: by_remote(s)[first]["ike_id"] != after["ike_id"])
    report(checks.lan_to_clients(topo, checks.SSDP_GROUP, names))

    # Disconnect the last client: its slot, rules and route go; the others keep working.
    last = topo.clients[-1]
    inspect.command(last.vici_socket, "terminate", {"ike": "gw", "timeout": 5000})
    wait_state("the disconnect", lambda s: len(s["slots"]) == len(names) - 1)
    rules = sh("iptables-save", "-t", "mangle")
    routes = sh("ip", "route", "show", "proto", "252")
    report(
        CheckResult(
            f"disconnect of {last.name} removes its rules and route",
            last.virtual_ip not in rules and last.virtual_ip not in routes,
            {"routes": routes.split("\n")},
        )
    )
    report(checks.lan_to_clients(topo, checks.SSDP_GROUP, names - {last.name}))
finally:
    daemon.send_signal(signal.SIGTERM)
    try:
        rc = daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        rc = -9

left = {
    "exit_code": rc,
    "chains": "FORECAST" in sh("iptables-save", "-t", "mangle"),
    "routes": sh("ip", "route", "show", "proto", "252").strip(),
    "xfrm_link": "fcxfrm0" in sh("ip", "-br", "link"),
    "lan_filters": sh("tc", "filter", "show", "dev", topo.gw_lan_if, "ingress").strip(),
    "pins": PIN_DIR.exists() and any(PIN_DIR.iterdir()),
    "state_file": STATE.exists(),
}
clean = left["exit_code"] == 0 and not any(v for k, v in left.items() if k != "exit_code")
report(CheckResult("stopping the daemon leaves nothing behind", clean, left))
if not all(r.ok for r in results):
    print(LOG.read_text()[-4000:], flush=True)
sys.exit(0 if all(r.ok for r in results) else 1)
