"""Read a lab host's IPsec state through its VICI socket (scripts only have the topology)."""

from __future__ import annotations

import socket
from typing import Any

import vici


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def child_sas(vici_socket: str) -> list[dict[str, str]]:
    """Installed CHILD_SAs as flat str dictionaries, ESP byte/packet counters included."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(vici_socket)
    try:
        sas = list(vici.Session(sock).list_sas())
    finally:
        sock.close()
    out = []
    for sa in sas:
        for ike_name, ike in sa.items():
            for child in ike.get("child-sas", {}).values():
                flat = {k: _s(v) for k, v in child.items() if not isinstance(v, list | dict)}
                flat["ike"] = _s(ike_name)
                flat["remote-id"] = _s(ike.get("remote-id", b""))
                for key in ("remote-host", "remote-port", "nat-any"):  # the IKE_SA's endpoint
                    flat[f"ike-{key}"] = _s(ike.get(key, b""))
                flat["remote-vips"] = " ".join(_s(v) for v in ike.get("remote-vips", []))
                flat["local-vips"] = " ".join(_s(v) for v in ike.get("local-vips", []))
                flat["remote-ts"] = " ".join(_s(v) for v in child.get("remote-ts", []))
                flat["local-ts"] = " ".join(_s(v) for v in child.get("local-ts", []))
                out.append(flat)
    return out


def esp_packets(vici_socket: str) -> dict[str, tuple[int, int]]:
    """CHILD_SA unique id → (packets in, packets out), as the kernel's SA counters report."""
    return {
        c["uniqueid"]: (int(c.get("packets-in", 0)), int(c.get("packets-out", 0)))
        for c in child_sas(vici_socket)
    }


def command(vici_socket: str, name: str, args: dict[str, Any]) -> None:
    """Run a VICI command (rekey, terminate, initiate) to completion; raises on failure."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(vici_socket)
    try:
        result = getattr(vici.Session(sock), name)(args)
        if result is not None and not isinstance(result, dict):
            for _log in result:  # streamed log messages; the command ends with the stream
                pass
    finally:
        sock.close()
