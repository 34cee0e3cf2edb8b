"""A running lab on this kernel: topology + one charon per host + tunnels up. Teardown is total."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forecast_lab import conns, ipsec_state, netns
from forecast_lab.charon import CharonError, CharonInstance
from forecast_lab.conns import GatewayMode
from forecast_lab.topology import Topology

DEFAULT_IF_ID = 42


@dataclass
class LabOptions:
    clients: int = 2
    identities: int = 1  # road-warrior identities (IKE_SAs) per client host
    mode: GatewayMode = GatewayMode.SEED
    if_id: int = DEFAULT_IF_ID
    # User-space ESP (kernel-libipsec) for kernels without ESP, e.g. this machine's kernel tier.
    libipsec: bool = False
    # Clients that do not negotiate the LAN's directed broadcast (by name, e.g. {"c2"}).
    no_broadcast: frozenset[str] = frozenset()
    # Clients behind a NAT router of their own (by name): UDP-encapsulated ESP, new mappings.
    nat: frozenset[str] = frozenset()
    # False: the gateway's children lack set_mark_in, so only the inbound MARK rule marks what
    # a client sends (forecast-bpf mode).
    set_mark_in: bool = True
    # Dual stack: an IPv6 LAN, IPv6 virtual IPs from a second pool, IPv6 multicast selectors.
    ipv6: bool = False
    connect: bool = True
    prefix: str = ""


class Lab:
    def __init__(self, options: LabOptions, log: Any = None) -> None:
        self.options = options
        self.log = log or sys.stderr
        self.topology = Topology.plan(
            options.prefix or netns.unique_prefix("fclab"),
            options.clients,
            options.identities,
            options.nat,
            options.ipv6,
        )
        self.workdir = Path(tempfile.mkdtemp(prefix=f"forecast-{self.topology.prefix}-"))
        self.charons: dict[str, CharonInstance] = {}
        self.timings: dict[str, float] = {}

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _say(self, msg: str) -> None:
        print(f"lab: {msg}", file=self.log, flush=True)

    # -- bring-up ---------------------------------------------------------------------------
    def up(self) -> None:
        t0 = time.monotonic()
        topo, opts = self.topology, self.options
        topo.build()
        topo.extra = {
            "gateway_mode": opts.mode.value,
            "if_id": str(opts.if_id),
            "kernel": platform.release(),
            "esp": "libipsec" if opts.libipsec else "kernel",
        }
        self.timings["topology_s"] = time.monotonic() - t0
        self._say(f"topology {topo.prefix}: gateway, {len(topo.clients)} clients, LAN host")

        t1 = time.monotonic()
        gw_opts: dict[str, dict[str, str]] = {}
        if opts.mode is GatewayMode.REFERENCE_PLUGIN:
            gw_opts["forecast"] = {"interface": topo.gw_lan_if, "reinject": conns.GATEWAY_CHILD}
        hosts = [(topo.gateway, True), *((c, False) for c in topo.clients)]
        for host, is_gw in hosts:
            instance = CharonInstance(
                host.name,
                host.netns,
                self.workdir / host.name,
                conns.charon_plugins(gateway=is_gw, mode=opts.mode, libipsec=opts.libipsec),
                gw_opts if is_gw else None,
            )
            self.charons[host.name] = instance
            host.vici_socket = str(instance.vici_socket)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda c: c.start(), self.charons.values()))
        self.timings["charons_s"] = time.monotonic() - t1

        self.load_gateway()
        for client in topo.clients:
            self.charons[client.name].load(
                conns=conns.client_conn(
                    name=client.name,
                    gateway_addr=topo.gateway.wan_addr,
                    lan_net=topo.lan_net,
                    lan_broadcast=None if opts.libipsec else topo.lan_broadcast,
                    identities=topo.identities,
                    lan_net6=topo.lan_net6 or None,
                    vip_pool6=topo.vip_pool6 or None,
                    libipsec=opts.libipsec,
                ),
                secrets=[conns.shared_secret()],
            )
        self._say(
            f"charons up ({opts.mode.value} gateway"
            f"{', libipsec ESP' if opts.libipsec else ', kernel ESP'})"
        )
        if opts.connect:
            self.connect_all()
        (self.workdir / "topology.json").write_text(topo.to_json())

    def load_gateway(self) -> None:
        """Load the gateway's conns, secret and pool (again, after a charon restart)."""
        topo, opts = self.topology, self.options
        self.charons["gw"].load(
            conns=conns.gateway_conn(
                wan_addr=topo.gateway.wan_addr,
                lan_net=topo.lan_net,
                lan_broadcast=topo.lan_broadcast,
                mode=opts.mode,
                if_id=opts.if_id,
                no_broadcast=opts.no_broadcast,
                set_mark_in=opts.set_mark_in,
                lan_net6=topo.lan_net6 or None,
                vip_pool6=topo.vip_pool6 or None,
                libipsec=opts.libipsec,
            ),
            secrets=[conns.shared_secret()],
            pools=conns.pool(topo.vip_pool, topo.vip_pool6 or None),
        )

    def connect(self, client: str, identity: int | None = None) -> None:
        """Bring up `client`'s tunnel (one identity, or every identity it holds)."""
        ks = conns.identity_numbers(self.topology.identities) if identity is None else [identity]
        for k in ks:
            # Under emulation, with hundreds of exchanges at once, one can time out: again.
            for attempt in range(3):
                try:
                    self.charons[client].initiate(
                        ike=conns.client_conn_name(k), child=conns.CLIENT_CHILD
                    )
                    break
                except CharonError:
                    if attempt == 2 or self.topology.identities == 1:
                        raise
        host = self.topology.host(client)
        host.virtual_ip = self.virtual_ip(client)
        if self.topology.lan_net6:
            host.virtual_ip6 = self.virtual_ip(client, 6)

    def connect_all(self) -> None:
        t0 = time.monotonic()
        pairs = [
            (c.name, k)
            for k in conns.identity_numbers(self.topology.identities)
            for c in self.topology.clients
        ]
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda pair: self.connect(*pair), pairs))
        self.timings["connect_s"] = time.monotonic() - t0
        if self.topology.identities == 1:
            vips = ", ".join(f"{c.name}={c.virtual_ip}" for c in self.topology.clients)
        else:
            vips = f"{len(pairs)} identities on {len(self.topology.clients)} hosts"
        self._say(f"tunnels up in {self.timings['connect_s']:.1f} s: {vips}")

    def rekey_child(self, client: str) -> None:
        """The client rekeys its CHILD_SA (new SPIs, same mark)."""
        self.charons[client].command("rekey", {"child": conns.CLIENT_CHILD})

    def disconnect(self, client: str, identity: int = 0) -> None:
        ike = conns.client_conn_name(identity)
        self.charons[client].command("terminate", {"ike": ike, "timeout": 5000})

    def virtual_ip(self, client: str, version: int = 4) -> str:
        for child in ipsec_state.child_sas(str(self.charons[client].vici_socket)):
            for vip in child["local-vips"].split():
                if (":" in vip) == (version == 6):
                    return vip
        raise RuntimeError(f"{client} has no IPv{version} virtual IP after connecting")

    # -- inspection -------------------------------------------------------------------------
    def child_sas(self, host: str = "gw") -> list[dict[str, str]]:
        return ipsec_state.child_sas(str(self.charons[host].vici_socket))

    # -- scripts ----------------------------------------------------------------------------
    def run_script(self, script: str, args: list[str] | None = None, timeout: float = 1800) -> int:
        """Run SCRIPT inside the gateway's namespace with the topology in its environment."""
        path = Path(script)
        if not path.exists():
            raise FileNotFoundError(f"lab script {script} does not exist")
        if os.access(path, os.X_OK):
            argv = [str(path.resolve())]
        elif path.suffix == ".py":
            argv = [sys.executable, str(path.resolve())]
        else:
            argv = ["sh", str(path.resolve())]
        env = {
            **os.environ,
            **self.topology.environment(self.workdir / "topology.json"),
            "PYTHON": sys.executable,
        }
        proc = subprocess.run(
            ["ip", "netns", "exec", self.topology.gateway.netns, *argv, *(args or [])],
            env=env,
            timeout=timeout,
            check=False,
        )
        return proc.returncode

    # -- teardown ---------------------------------------------------------------------------
    def down(self) -> None:
        # All at once: a charon ending with hundreds of SAs takes seconds to say goodbye.
        with ThreadPoolExecutor(max_workers=len(self.charons) or 1) as pool:
            list(pool.map(lambda c: c.stop(), self.charons.values()))
        self.topology.destroy()
        if os.environ.get("FORECAST_LAB_KEEP") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)
        left = netns.list_with_prefix(self.topology.prefix)
        if left:
            raise RuntimeError(f"lab teardown left namespaces behind: {left}")
