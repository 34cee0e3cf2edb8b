"""The lab's network: a gateway (WAN + LAN), N road-warrior clients on a WAN switch, a LAN host.

    c1 ─┐                     ┌─ gw eth0 192.168.0.1   gw eth1 10.1.0.1/16 ── lan eth0 10.1.0.10
    c2 ─┼─ br0 (switch netns) ┘
    cN ─┘   clients: eth0 192.168.0.(100+i); virtual IPs from the gateway's pool 10.1.0.128/25

A client may sit behind its own NAT router (`nat`): its eth0 is 10.99.<i>.2 on a link to the
router's, the router masquerades it onto the switch as 192.168.0.(200+i), to a random port of
40000-40999 per new mapping, so charon negotiates UDP encapsulation and a new mapping (see
`renew_nat_mapping`) shows up at the gateway as a new outer port.

A client host may hold several road-warrior identities (`identities`), each its own IKE_SA
with its own virtual IP: 20 hosts x 50 identities give 1,000 real SAs without 1,000 charons.
Labs of more than 120 identities draw virtual IPs from 10.1.16.0/20 instead.

Dual stack (`ipv6`): the LAN is also fd00:1::/64 (gateway ::1, LAN host ::10, its default
route via the gateway) and each client also gets an IPv6 virtual IP from fd00:2::/112, routed
by the gateway (no neighbour proxy needed: the LAN host sends everything to its router).

Everything lives in namespaces named <prefix>-<host>; the prefix is unique per run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forecast_lab import netns

WAN_PREFIXLEN = 24
GW_WAN_ADDR = "192.168.0.1"
LAN_NET = "10.1.0.0/16"
LAN_BROADCAST = "10.1.255.255"
GW_LAN_ADDR = "10.1.0.1"
LAN_HOST_ADDR = "10.1.0.10"
VIP_POOL = "10.1.0.128/25"
LARGE_VIP_POOL = "10.1.16.0/20"
MAX_CLIENTS = 100
MAX_IDENTITIES = 100  # per client host
MAX_SAS = 4000  # what LARGE_VIP_POOL holds
LAN_NET6 = "fd00:1::/64"
GW_LAN_ADDR6 = "fd00:1::1"
LAN_HOST_ADDR6 = "fd00:1::10"
VIP_POOL6 = "fd00:2::/112"


@dataclass
class Host:
    name: str
    netns: str
    wan_addr: str = ""
    lan_addr: str = ""
    vici_socket: str = ""
    virtual_ip: str = ""
    virtual_ip6: str = ""  # dual-stack labs
    lan_addr6: str = ""
    nat_router: str = ""  # the namespace of the NAT router in front of it, if any
    nat_addr: str = ""  # the router's address on the switch: what the gateway sees


@dataclass
class Topology:
    prefix: str
    gateway: Host
    lan_host: Host
    clients: list[Host]
    switch_netns: str
    gw_wan_if: str = "eth0"
    gw_lan_if: str = "eth1"
    lan_net: str = LAN_NET
    lan_broadcast: str = LAN_BROADCAST
    vip_pool: str = VIP_POOL
    extra: dict[str, str] = field(default_factory=dict)
    identities: int = 1  # road-warrior identities (IKE_SAs) per client host
    lan_net6: str = ""  # dual stack when set
    vip_pool6: str = ""

    @classmethod
    def plan(
        cls,
        prefix: str,
        clients: int,
        identities: int = 1,
        nat: frozenset[str] = frozenset(),
        ipv6: bool = False,
    ) -> Topology:
        if not 1 <= clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be 1..{MAX_CLIENTS}, got {clients}")
        if not 1 <= identities <= MAX_IDENTITIES:
            raise ValueError(f"identities must be 1..{MAX_IDENTITIES}, got {identities}")
        if clients * identities > MAX_SAS:
            raise ValueError(f"{clients} x {identities} identities: at most {MAX_SAS} in all")
        hosts = [
            Host(f"c{i}", f"{prefix}-c{i}", f"192.168.0.{100 + i}") for i in range(1, clients + 1)
        ]
        unknown = nat - {h.name for h in hosts}
        if unknown:
            raise ValueError(f"nat names no client of this lab: {sorted(unknown)}")
        for i, host in enumerate(hosts, 1):
            if host.name in nat:
                host.wan_addr = f"10.99.{i}.2"
                host.nat_router = f"{prefix}-nat{i}"
                host.nat_addr = f"192.168.0.{200 + i}"
        return cls(
            identities=identities,
            vip_pool=VIP_POOL if clients * identities <= 120 else LARGE_VIP_POOL,
            prefix=prefix,
            gateway=Host(
                "gw",
                f"{prefix}-gw",
                GW_WAN_ADDR,
                GW_LAN_ADDR,
                lan_addr6=GW_LAN_ADDR6 if ipv6 else "",
            ),
            lan_host=Host(
                "lan",
                f"{prefix}-lan",
                lan_addr=LAN_HOST_ADDR,
                lan_addr6=LAN_HOST_ADDR6 if ipv6 else "",
            ),
            clients=hosts,
            switch_netns=f"{prefix}-sw",
            lan_net6=LAN_NET6 if ipv6 else "",
            vip_pool6=VIP_POOL6 if ipv6 else "",
        )

    @property
    def namespaces(self) -> list[str]:
        return [
            self.switch_netns,
            self.gateway.netns,
            self.lan_host.netns,
            *(c.netns for c in self.clients),
            *(c.nat_router for c in self.clients if c.nat_router),
        ]

    def host(self, name: str) -> Host:
        for h in (self.gateway, self.lan_host, *self.clients):
            if h.name == name:
                return h
        raise KeyError(f"no lab host named {name!r}")

    # -- build / destroy --------------------------------------------------------------------
    def build(self) -> None:
        try:
            self._build()
        except Exception:
            self.destroy()
            raise

    def _build(self) -> None:
        for ns in self.namespaces:
            netns.create(ns)
            # Addresses usable at once: duplicate address detection would hold a link-local
            # source back for seconds under emulation (and a lab has no duplicates).
            netns.run(
                [
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
                netns=ns,
            )
        sw = self.switch_netns
        netns.run(["ip", "link", "add", "br0", "type", "bridge"], netns=sw)
        netns.run(["ip", "link", "set", "br0", "up"], netns=sw)
        for host in (self.gateway, *self.clients):
            port = f"p-{host.name}"
            on_switch = host.nat_router or host.netns
            netns.add_veth(port, sw, "eth0", on_switch)
            netns.run(["ip", "link", "set", port, "master", "br0", "up"], netns=sw)
            if host.nat_router:
                self._nat_router(host)
            else:
                self._address(host.netns, "eth0", f"{host.wan_addr}/{WAN_PREFIXLEN}")
        gw, lan = self.gateway.netns, self.lan_host.netns
        netns.add_veth(self.gw_lan_if, gw, "eth0", lan)
        plen = self.lan_net.split("/")[1]
        self._address(gw, self.gw_lan_if, f"{self.gateway.lan_addr}/{plen}")
        self._address(lan, "eth0", f"{self.lan_host.lan_addr}/{plen}")
        netns.run(["ip", "route", "add", "default", "via", self.gateway.lan_addr], netns=lan)
        netns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], netns=gw)
        if self.lan_net6:
            plen6 = self.lan_net6.split("/")[1]
            for ns, dev, addr in (
                (gw, self.gw_lan_if, self.gateway.lan_addr6),
                (lan, "eth0", self.lan_host.lan_addr6),
            ):
                netns.run(["ip", "-6", "addr", "add", f"{addr}/{plen6}", "dev", dev], netns=ns)
            netns.run(
                ["ip", "-6", "route", "add", "default", "via", self.gateway.lan_addr6], netns=lan
            )
            netns.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"], netns=gw)
        for ns in self.namespaces:
            netns.run(
                [
                    "sysctl",
                    "-qw",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
                netns=ns,
            )
        for client in self.clients:
            # Clients hold a /32 virtual IP: without this local broadcast route the LAN's
            # directed broadcast would never be delivered to them (docs/design.md, The lab).
            netns.run(
                [
                    "ip",
                    "route",
                    "add",
                    "broadcast",
                    self.lan_broadcast,
                    "dev",
                    "eth0",
                    "table",
                    "local",
                ],
                netns=client.netns,
            )

    def _nat_router(self, client: Host) -> None:
        router, inside = client.nat_router, client.wan_addr.rsplit(".", 1)[0]
        self._address(router, "eth0", f"{client.nat_addr}/{WAN_PREFIXLEN}")
        netns.add_veth("eth1", router, "eth0", client.netns)
        self._address(router, "eth1", f"{inside}.1/24")
        self._address(client.netns, "eth0", f"{client.wan_addr}/24")
        netns.run(["ip", "route", "add", "default", "via", f"{inside}.1"], netns=client.netns)
        netns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], netns=router)
        netns.run(
            [
                "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-p", "udp",
                "-j", "MASQUERADE", "--to-ports", "40000-40999", "--random",
            ],
            netns=router,
        )  # fmt: skip

    def renew_nat_mapping(self, client: Host) -> None:
        """The NAT router forgets its mappings, as a home router does when its address is
        renewed: removing the address makes the kernel drop every masqueraded connection
        through it; the client's next packet gets a new random outer port."""
        cidr = f"{client.nat_addr}/{WAN_PREFIXLEN}"
        netns.run(["ip", "addr", "del", cidr, "dev", "eth0"], netns=client.nat_router)
        netns.run(["ip", "addr", "add", cidr, "brd", "+", "dev", "eth0"], netns=client.nat_router)

    def _address(self, ns: str, ifname: str, cidr: str) -> None:
        netns.run(["ip", "addr", "add", cidr, "brd", "+", "dev", ifname], netns=ns)
        netns.run(["ip", "link", "set", ifname, "up"], netns=ns)
        # veth TX checksum offload leaves copies made from captured bytes (the reference
        # plugin's way) with unfinished checksums (docs/design.md, The lab).
        netns.run(["ethtool", "-K", ifname, "tx", "off"], netns=ns)

    def destroy(self) -> None:
        for ns in reversed(self.namespaces):
            netns.delete(ns)

    # -- description for scripts ------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Topology:
        data = json.loads(text)
        return cls(
            prefix=data["prefix"],
            gateway=Host(**data["gateway"]),
            lan_host=Host(**data["lan_host"]),
            clients=[Host(**c) for c in data["clients"]],
            switch_netns=data["switch_netns"],
            gw_wan_if=data["gw_wan_if"],
            gw_lan_if=data["gw_lan_if"],
            lan_net=data["lan_net"],
            lan_broadcast=data["lan_broadcast"],
            vip_pool=data["vip_pool"],
            extra=data.get("extra", {}),
            identities=int(data.get("identities", 1)),
            lan_net6=data.get("lan_net6", ""),
            vip_pool6=data.get("vip_pool6", ""),
        )

    @property
    def nat(self) -> frozenset[str]:
        return frozenset(c.name for c in self.clients if c.nat_router)

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        return cls.from_json(Path(path).read_text())

    def environment(self, json_path: Path) -> dict[str, str]:
        """The topology as environment variables, for scripts in any language."""
        env = {
            "FORECAST_LAB_TOPOLOGY": str(json_path),
            "FORECAST_LAB_PREFIX": self.prefix,
            "FORECAST_LAB_CLIENTS": " ".join(c.name for c in self.clients),
            "FORECAST_LAB_GW_WAN_IF": self.gw_wan_if,
            "FORECAST_LAB_GW_LAN_IF": self.gw_lan_if,
            "FORECAST_LAB_LAN_NET": self.lan_net,
            "FORECAST_LAB_LAN_BROADCAST": self.lan_broadcast,
            "FORECAST_LAB_IDENTITIES": str(self.identities),
            **{f"FORECAST_LAB_{k.upper()}": v for k, v in self.extra.items()},
        }
        for host in (self.gateway, self.lan_host, *self.clients):
            key = f"FORECAST_LAB_{host.name.upper()}"
            env[f"{key}_NS"] = host.netns
            for attr in (
                "wan_addr",
                "lan_addr",
                "lan_addr6",
                "vici_socket",
                "virtual_ip",
                "virtual_ip6",
                "nat_addr",
            ):
                value = getattr(host, attr)
                if value:
                    env[f"{key}_{attr.upper()}"] = value
        return env
