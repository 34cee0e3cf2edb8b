"""swanctl connection definitions for the lab, as VICI `load-conn` dictionaries (pure data).

The gateway's child follows the seed (`../shared/seed/forecast-plugin.txt`): the LAN and multicast
locally, the client's virtual IP, multicast and the LAN's directed broadcast remotely, a unique mark
per SA. The gateway modes add what each forwarder needs on top.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

IKE_PROPOSAL = "aes128-sha256-x25519"  # Debian's charon has no gcm/openssl plugin
ESP_PROPOSAL = "aes128-sha256"
PSK = "forecast-lab-preshared-key"
GATEWAY_CONN = "rw"
GATEWAY_CHILD = "rw"
CLIENT_CONN = "gw"
CLIENT_CHILD = "gw"
POOL_NAME = "rw-pool"

BASE_PLUGINS = (
    "random nonce aes sha1 sha2 hmac kdf curve25519 pem pkcs1 x509 revocation constraints "
    "pubkey attr"
).split()


class GatewayMode(str, Enum):
    SEED = "seed"  # the seed's config alone: marks, no forwarder
    FORECAST_BPF = "forecast-bpf"  # + if_id_in/out and set_mark_in = %same (datapath.md)
    REFERENCE_PLUGIN = "reference-plugin"  # + strongSwan's own forecast plugin


def charon_plugins(*, gateway: bool, mode: GatewayMode, libipsec: bool) -> list[str]:
    # kernel-libipsec must come before kernel-netlink to take over ESP (lab.md).
    kernel = ["kernel-libipsec", "kernel-netlink"] if libipsec else ["kernel-netlink"]
    extra = ["farp"] if gateway else []
    if gateway and mode is GatewayMode.REFERENCE_PLUGIN:
        extra.append("forecast")
    return [*BASE_PLUGINS, *kernel, "socket-default", "vici", *extra]


def gateway_conn(*, wan_addr: str, lan_net: str, lan_broadcast: str, mode: GatewayMode,
                 if_id: int) -> dict[str, Any]:
    child: dict[str, Any] = {
        "local_ts": [lan_net, "224.0.0.0/4"],
        "remote_ts": ["dynamic", "224.0.0.0/4", lan_broadcast],
        "mark_in": "%unique",
        "mark_out": "%unique",
        "esp_proposals": [ESP_PROPOSAL],
    }
    if mode is GatewayMode.FORECAST_BPF:
        child |= {"if_id_in": str(if_id), "if_id_out": str(if_id), "set_mark_in": "%same"}
    return {
        GATEWAY_CONN: {
            "version": "2",
            "local_addrs": [wan_addr],
            "proposals": [IKE_PROPOSAL],
            "pools": [POOL_NAME],
            "local": {"auth": "psk", "id": "gw@forecast.lab"},
            "remote": {"auth": "psk"},
            "children": {GATEWAY_CHILD: child},
        }
    }


def client_conn(*, name: str, gateway_addr: str, lan_net: str, lan_broadcast: str | None
                ) -> dict[str, Any]:
    """A road warrior. `lan_broadcast` None: the client does not negotiate the directed broadcast
    (libipsec rejects a non-local broadcast TS on the client, and it tests narrowing)."""
    local_ts = ["dynamic", "224.0.0.0/4", *([lan_broadcast] if lan_broadcast else [])]
    return {
        CLIENT_CONN: {
            "version": "2",
            "remote_addrs": [gateway_addr],
            "vips": ["0.0.0.0"],
            "proposals": [IKE_PROPOSAL],
            "local": {"auth": "psk", "id": f"{name}@forecast.lab"},
            "remote": {"auth": "psk", "id": "gw@forecast.lab"},
            "children": {
                CLIENT_CHILD: {
                    "local_ts": local_ts,
                    "remote_ts": [lan_net, "224.0.0.0/4"],
                    "esp_proposals": [ESP_PROPOSAL],
                }
            },
        }
    }


def shared_secret() -> dict[str, Any]:
    return {"type": "IKE", "data": PSK, "owners": []}


def pool(addrs: str) -> dict[str, Any]:
    return {POOL_NAME: {"addrs": addrs}}
