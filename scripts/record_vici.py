"""Record what charon says over VICI in a scenario, for the unit tests.

Runs the kernel tier's lab (real charons, user-space ESP) on this machine, as root. Every event
the gateway emits is written, in order, to tests/fixtures/vici-5.9.8/<scenario>/NNN-<event>.json
(the format of the other recordings), and a `list-sas` snapshot at the scenario's end to
list-sas/gw-<snapshot>.json. Scenarios:

  moves       c1 connects, then its WAN address changes from 192.168.0.101 to 192.168.0.201
              and its charon moves the IKE_SA with MOBIKE (snapshot: after-move)
  dual-stack  a dual-stack lab: c1 connects and gets an IPv4 and an IPv6 virtual IP, its
              CHILD_SA carries IPv6 selectors too; then a CHILD_SA rekey (snapshot: dual-stack)

    sudo .venv/bin/python scripts/record_vici.py moves|dual-stack
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vici

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forecast_lab import netns  # noqa: E402
from forecast_lab.conns import GatewayMode  # noqa: E402
from forecast_lab.lab import Lab, LabOptions  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "vici-5.9.8"
EVENTS = ["ike-updown", "child-updown", "child-rekey", "ike-rekey", "ike-update"]
NEW_ADDR = "192.168.0.201"
Events = list[tuple[float, str, Any]]


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _wait_for(events: Events, what: str, found: Callable[[tuple[float, str, Any]], bool]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if any(found(e) for e in events):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no {what} within 15 s")


def moves(lab: Lab, events: Events) -> None:
    c1 = lab.topology.host("c1")
    lab.connect("c1")
    time.sleep(0.5)
    # Without promote_secondaries, removing the primary address would take the new one too.
    netns.run(["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"], netns=c1.netns)
    netns.run(["ip", "addr", "add", f"{NEW_ADDR}/24", "dev", "eth0"], netns=c1.netns)
    netns.run(["ip", "addr", "del", f"{c1.wan_addr}/24", "dev", "eth0"], netns=c1.netns)
    _wait_for(
        events,
        "ike-update for the move",
        lambda e: e[1] == "ike-update" and NEW_ADDR in json.dumps(e[2]),
    )


def dual_stack(lab: Lab, events: Events) -> None:
    lab.connect("c1")
    _wait_for(events, "child-updown", lambda e: e[1] == "child-updown")
    lab.rekey_child("c1")
    _wait_for(events, "child-rekey", lambda e: e[1] == "child-rekey")
    time.sleep(0.5)


SCENARIOS: dict[str, tuple[Callable[[Lab, Events], None], str, bool]] = {
    # name: (steps, snapshot name, dual stack)
    "moves": (moves, "after-move", False),
    "dual-stack": (dual_stack, "dual-stack", True),
}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in SCENARIOS:
        print(f"usage: record_vici.py {'|'.join(SCENARIOS)}", file=sys.stderr)
        return 2
    name = sys.argv[1]
    steps, snapshot_name, ipv6 = SCENARIOS[name]
    out = FIXTURES / name
    lab = Lab(
        LabOptions(
            clients=1,
            libipsec=True,
            mode=GatewayMode.FORECAST_BPF,
            if_id=42,
            connect=False,
            prefix=netns.unique_prefix("fcrec"),
            ipv6=ipv6,
        )
    )
    events: Events = []
    done = threading.Event()

    def listen(path: str) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        for label, msg in vici.Session(sock).listen(EVENTS, timeout=0.2):
            if label is not None:
                events.append((time.time(), label.decode(), _plain(msg)))
            elif done.is_set():
                return

    try:
        lab.up()
        gw = lab.topology.gateway
        listener = threading.Thread(target=listen, args=(gw.vici_socket,), daemon=True)
        listener.start()
        time.sleep(0.5)
        try:
            steps(lab, events)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(gw.vici_socket)
        snapshot = [_plain(m) for m in vici.Session(sock).list_sas()]
        sock.close()
        done.set()
        listener.join(timeout=2)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.json"):
            old.unlink()
        for i, (at, label, payload) in enumerate(events, 1):
            record = {"event": label, "received_at": at, "payload": payload}
            (out / f"{i:03d}-{label}.json").write_text(json.dumps(record, indent=2) + "\n")
        (FIXTURES / "list-sas" / f"gw-{snapshot_name}.json").write_text(
            json.dumps({"list-sas": snapshot}, indent=2) + "\n"
        )
        print(f"{len(events)} events and a snapshot in {out}")
        return 0
    finally:
        done.set()
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
