"""swanctl connection definitions for the lab, as VICI `load-conn` dictionaries (pure data).

The gateway's child follows strongSwan's documented forecast plugin configuration: the LAN and
multicast locally, the client's virtual IP, multicast and the LAN's directed broadcast remotely, a
unique mark per SA. The gateway modes add what each forwarder needs on top.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

IKE_PROPOSAL = "aes128-sha256-x25519"  # Debian's charon has no gcm/openssl plugin
ESP_PROPOSAL = "aes128-sha256"
PSK = "forecast-lab-preshared-key"
GATEWAY_CONN = "rw"
GATEWAY_CHILD = "rw"
# Child config name for clients that must not get the LAN's directed broadcast (a separate
# name also lets `reinject` tell the two groups apart).
GATEWAY_CHILD_NO_BROADCAST = "rw-nobcast"
CLIENT_CONN = "gw"
CLIENT_CHILD = "gw"
POOL_NAME = "rw-pool"
POOL6_NAME = "rw-pool6"
# IPv6 multicast the lab's SAs carry: link-local scope, where discovery lives (mDNS ff02::fb,
# LLMNR ff02::1:3, SSDP ff02::c). The LAN side names all IPv6 multicast and link-local sources
# (a host announces from its link-local address), and the IPv6 virtual IPs, which lie outside
# the LAN's /64: a client's multicast reinjected to another client carries its virtual IP.
MULTICAST6_LINK = "ff02::/16"
MULTICAST6 = "ff00::/8"
LINK_LOCAL6 = "fe80::/10"
GATEWAY_ID = "gw@forecast.lab"

BASE_PLUGINS = [
    "random",
    "nonce",
    "aes",
    "sha1",
    "sha2",
    "hmac",
    "kdf",
    "curve25519",
    "pem",
    "pkcs1",
    "x509",
    "revocation",
    "constraints",
    "pubkey",
    "attr",
]


class GatewayMode(StrEnum):
    SEED = "seed"  # the seed's config alone: marks, no forwarder
    FORECAST_BPF = "forecast-bpf"  # + if_id_in/out and set_mark_in = %same (docs/design.md)
    REFERENCE_PLUGIN = "reference-plugin"  # + strongSwan's own forecast plugin


def charon_plugins(*, gateway: bool, mode: GatewayMode, libipsec: bool) -> list[str]:
    # kernel-libipsec must come before kernel-netlink to take over ESP (docs/design.md, The lab).
    kernel = ["kernel-libipsec", "kernel-netlink"] if libipsec else ["kernel-netlink"]
    extra = ["farp"] if gateway else []
    if gateway and mode is GatewayMode.REFERENCE_PLUGIN:
        extra.append("forecast")
    return [*BASE_PLUGINS, *kernel, "socket-default", "vici", *extra]


def local_side6(lan_net6: str | None, vip_pool6: str | None, libipsec: bool = False) -> list[str]:
    """The gateway's side of a dual-stack child, IPv6 part (none without an IPv6 LAN).
    libipsec: only the LAN and multicast; it routes every other selector through its TUN
    device from a gateway address inside it, and the gateway has none in the pool or, usable
    as a source, in fe80::/10 (the kernel tier checks rules and routes, not forwarding)."""
    if not lan_net6:
        return []
    if libipsec:
        return [lan_net6, MULTICAST6]
    return [lan_net6, *([vip_pool6] if vip_pool6 else []), LINK_LOCAL6, MULTICAST6]


def client_id(name: str, identity: int = 0) -> str:
    """A road warrior's IKE identity; identity k (1..) of a host that holds several."""
    return f"{name}-{identity}@forecast.lab" if identity else f"{name}@forecast.lab"


def client_conn_name(identity: int = 0) -> str:
    return f"{CLIENT_CONN}-{identity}" if identity else CLIENT_CONN


def identity_numbers(identities: int) -> list[int]:
    """[0] for a host with one identity (the plain names), else 1..identities."""
    return [0] if identities == 1 else list(range(1, identities + 1))


def gateway_conn(
    *,
    wan_addr: str,
    lan_net: str,
    lan_broadcast: str,
    mode: GatewayMode,
    if_id: int,
    no_broadcast: frozenset[str] = frozenset(),
    set_mark_in: bool = True,
    lan_net6: str | None = None,
    vip_pool6: str | None = None,
    libipsec: bool = False,
) -> dict[str, Any]:
    """The gateway's connections: `rw` for everyone, plus one per client in `no_broadcast`
    whose child lacks the broadcast TS. A client proposes 0.0.0.0/0 for `dynamic` before it
    knows its virtual IP, so only the gateway can narrow the broadcast away."""

    v6_local = local_side6(lan_net6, vip_pool6, libipsec)
    v6_remote = [MULTICAST6_LINK] if lan_net6 else []

    def child(remote_ts: list[str]) -> dict[str, Any]:
        c: dict[str, Any] = {
            "local_ts": [lan_net, "224.0.0.0/4", *v6_local],
            "remote_ts": [*remote_ts, *v6_remote],
            "mark_in": "%unique",
            "mark_out": "%unique",
            "esp_proposals": [ESP_PROPOSAL],
        }
        if mode is GatewayMode.FORECAST_BPF:
            c |= {"if_id_in": str(if_id), "if_id_out": str(if_id)}
            if set_mark_in:
                c["set_mark_in"] = "%same"
        return c

    def conn(remote_id: str | None, children: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": "2",
            "local_addrs": [wan_addr],
            "proposals": [IKE_PROPOSAL],
            "pools": [POOL_NAME, *([POOL6_NAME] if lan_net6 else [])],
            "local": {"auth": "psk", "id": GATEWAY_ID},
            "remote": {"auth": "psk", **({"id": remote_id} if remote_id else {})},
            "children": children,
        }

    conns = {
        GATEWAY_CONN: conn(None, {GATEWAY_CHILD: child(["dynamic", "224.0.0.0/4", lan_broadcast])})
    }
    for name in sorted(no_broadcast):
        conns[f"{GATEWAY_CONN}-{name}"] = conn(
            client_id(name), {GATEWAY_CHILD_NO_BROADCAST: child(["dynamic", "224.0.0.0/4"])}
        )
    return conns


# Shared by every identity of a multi-identity host (see client_conn).
SHARED_REQID = 1


def client_conn(
    *,
    name: str,
    gateway_addr: str,
    lan_net: str,
    lan_broadcast: str | None,
    identities: int = 1,
    lan_net6: str | None = None,
    vip_pool6: str | None = None,
    libipsec: bool = False,
) -> dict[str, Any]:
    """A road warrior. The client narrows the gateway's reply against its own local_ts, so the
    broadcast must be named here or its inbound policy drops the decrypted broadcast. None:
    left out, for libipsec, which rejects a non-local broadcast TS on the client
    (docs/design.md, The lab).

    Several identities on one host: one connection each. Their SAs share the inbound
    multicast policy (LAN → 224.0.0.0/4 is the same selector for all), and the kernel checks a
    decrypted packet against that one policy's template reqid, so they share one fixed reqid;
    with one reqid each, every identity but one would have its multicast dropped."""
    local_ts = [
        "dynamic",
        "224.0.0.0/4",
        *([lan_broadcast] if lan_broadcast else []),
        *([MULTICAST6_LINK] if lan_net6 else []),
    ]
    remote_ts = [lan_net, "224.0.0.0/4", *local_side6(lan_net6, vip_pool6, libipsec)]
    out = {}
    for k in identity_numbers(identities):
        child: dict[str, Any] = {
            "local_ts": local_ts,
            "remote_ts": remote_ts,
            "esp_proposals": [ESP_PROPOSAL],
        }
        if k:
            child["reqid"] = str(SHARED_REQID)
        out[client_conn_name(k)] = {
            "version": "2",
            "remote_addrs": [gateway_addr],
            "vips": ["0.0.0.0", *(["::"] if lan_net6 else [])],
            "proposals": [IKE_PROPOSAL],
            "local": {"auth": "psk", "id": client_id(name, k)},
            "remote": {"auth": "psk", "id": GATEWAY_ID},
            "children": {CLIENT_CHILD: child},
        }
    return out


def shared_secret() -> dict[str, Any]:
    return {"type": "IKE", "data": PSK, "owners": []}


def pool(addrs: str, addrs6: str | None = None) -> dict[str, Any]:
    return {POOL_NAME: {"addrs": addrs}, **({POOL6_NAME: {"addrs": addrs6}} if addrs6 else {})}
