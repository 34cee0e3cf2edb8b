"""Record what charon says over VICI when a client moves (MOBIKE), for the unit tests.

Runs the kernel tier's lab (real charons, user-space ESP) on this machine, as root: c1
connects, then its WAN address changes from 192.168.0.101 to 192.168.0.201 and its charon
moves the IKE_SA with MOBIKE. Every event the gateway emits is written, in order, to
tests/fixtures/vici-5.9.8/moves/NNN-<event>.json (the format of the other recordings), and a
`list-sas` snapshot after the move to list-sas/gw-after-move.json.

    sudo .venv/bin/python scripts/record_moves.py
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import vici

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forecast.lab import netns  # noqa: E402
from forecast.lab.conns import GatewayMode  # noqa: E402
from forecast.lab.lab import Lab, LabOptions  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "vici-5.9.8" / "moves"
EVENTS = ["ike-updown", "child-updown", "child-rekey", "ike-rekey", "ike-update"]
NEW_ADDR = "192.168.0.201"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def main() -> int:
    lab = Lab(
        LabOptions(
            clients=1,
            libipsec=True,
            mode=GatewayMode.FORECAST_BPF,
            if_id=42,
            connect=False,
            prefix=netns.unique_prefix("fcrec"),
        )
    )
    events: list[tuple[float, str, Any]] = []
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
        gw, c1 = lab.topology.gateway, lab.topology.host("c1")
        listener = threading.Thread(target=listen, args=(gw.vici_socket,), daemon=True)
        listener.start()
        time.sleep(0.5)
        lab.connect("c1")
        time.sleep(0.5)
        # Without promote_secondaries, removing the primary address would take the new one too.
        netns.run(["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"], netns=c1.netns)
        netns.run(["ip", "addr", "add", f"{NEW_ADDR}/24", "dev", "eth0"], netns=c1.netns)
        netns.run(["ip", "addr", "del", f"{c1.wan_addr}/24", "dev", "eth0"], netns=c1.netns)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if any(e[1] == "ike-update" and NEW_ADDR in json.dumps(e[2]) for e in events):
                break
            time.sleep(0.1)
        else:
            print("no ike-update for the move within 15 s", file=sys.stderr)
            return 1
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(gw.vici_socket)
        snapshot = [_plain(m) for m in vici.Session(sock).list_sas()]
        sock.close()
        done.set()
        listener.join(timeout=2)
        OUT.mkdir(parents=True, exist_ok=True)
        for old in OUT.glob("*.json"):
            old.unlink()
        for i, (at, label, payload) in enumerate(events, 1):
            record = {"event": label, "received_at": at, "payload": payload}
            (OUT / f"{i:03d}-{label}.json").write_text(json.dumps(record, indent=2) + "\n")
        (OUT.parent / "list-sas" / "gw-after-move.json").write_text(
            json.dumps({"list-sas": snapshot}, indent=2) + "\n"
        )
        print(f"{len(events)} events and a snapshot in {OUT}")
        return 0
    finally:
        done.set()
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
