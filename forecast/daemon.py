"""The daemon: observe (VICI) → desire (pure) → act (maps, rules, routes), until stopped.

Set-up builds what does not depend on SAs (programs, XFRM interface, groups, our chains);
every VICI snapshot or event then reconciles the SA-dependent state against what was last
applied. Teardown removes everything the daemon created, in reverse order.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from forecast import bpf_build, desired, links, metrics, netfilter, tc
from forecast.config import Config
from forecast.datapath import Datapath, DatapathConfig, SaEntry
from forecast.sa import Change, PayloadError, SaTable
from forecast.sdnotify import Notifier
from forecast.vici_source import BACKOFF_S, EventStream, ViciUnavailable, list_sas

RESYNC_S = 30.0  # a fresh snapshot this often: any missed event is repaired within it
log = logging.getLogger("forecast-bpf")


@dataclass
class Health:
    vici_connected: bool = False
    last_event: float | None = None
    sync_errors: int = 0
    snapshots: int = 0
    started: float = field(default_factory=time.time)
    changes: dict[str, int] = field(default_factory=dict)  # kind → count, for churn


class Daemon:
    def __init__(self, cfg: Config, *, xfrm: links.XfrmInterface | None = None) -> None:
        self.cfg = cfg
        self.table = SaTable()
        self.health = Health()
        self._xfrm_given = xfrm
        self.xfrm: links.XfrmInterface | None = xfrm
        self.lan: links.LanInterface | None = None
        self.datapath: Datapath | None = None
        self.rules: netfilter.Rules | None = None
        self.groups: links.GroupMemberships | None = None
        self.mounted_bpffs: Path | None = None
        self.attached: list[int] = []
        # What was last applied, so each reconcile changes only the difference.
        self.slot_by_mark: dict[int, int] = {}
        self.written: dict[int, SaEntry] = {}
        self.rules_applied: list[desired.MarkRule] | None = None
        self.routes_applied: set[IPv4Network] = set()
        self.reported: set[str] = set()
        self.last_desired = desired.Desired()
        self.notifier = Notifier()
        self.metrics_server: Any = None

    # -- set-up -----------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        try:
            bpffs_root = cfg.pin_dir.parent
            if bpf_build.ensure_bpffs(bpffs_root):
                self.mounted_bpffs = bpffs_root
            self.lan = links.find_lan(cfg.interface, exclude=[cfg.xfrm.name])
            log.info(
                "LAN interface %s (%s, broadcast %s)",
                self.lan.name,
                self.lan.address,
                self.lan.broadcast,
            )
            if self.xfrm is None:
                dev = cfg.xfrm.dev or links.default_route_device()
                self.xfrm = links.ensure_xfrm(cfg.xfrm.name, cfg.xfrm.if_id, dev)
                log.info(
                    "XFRM interface %s (if_id %d on %s, %s)",
                    self.xfrm.name,
                    cfg.xfrm.if_id,
                    dev,
                    "created" if self.xfrm.created else "existing",
                )
            self.datapath = Datapath(cfg.pin_dir)
            self.datapath.load()
            self.slot_by_mark = self.datapath.active_slots()
            if self.slot_by_mark:
                log.info(
                    "adopted %d SA slots from pinned maps in %s",
                    len(self.slot_by_mark),
                    cfg.pin_dir,
                )
            self.datapath.write_config(
                DatapathConfig(
                    xfrm_ifindex=self.xfrm.index,
                    lan_ifindex=self.lan.index,
                    lan_mac=self.lan.mac,
                    lan_broadcast=self.lan.broadcast,
                    groups=cfg.groups,
                )
            )
            tc.attach(self.lan.index, self.datapath.fds["lan"], "fc_lan_ingress")
            self.attached.append(self.lan.index)
            tc.attach(self.xfrm.index, self.datapath.fds["tunnel"], "fc_tunnel_ingress")
            self.attached.append(self.xfrm.index)
            self.groups = links.GroupMemberships(self.lan, cfg.groups)
            self.rules = netfilter.Rules()
            log.info(
                "netfilter back end: iptables (%s), chains %s",
                self.rules.backend.variant,
                ", ".join(netfilter.CHAINS.values()),
            )
            self.rules.apply([])
            self.rules_applied = []
            try:
                _thread, self.metrics_server = metrics.serve(self, cfg.metrics_address)
            except OSError as exc:
                raise links.LinkError(
                    f"metrics_address {cfg.metrics_address}: {exc.strerror or exc}"
                ) from None
            log.info("metrics on http://%s/metrics", cfg.metrics_address)
        except BaseException:
            self.teardown()
            raise

    # -- reconcile --------------------------------------------------------------------------
    def reconcile(self) -> None:
        assert self.datapath and self.rules and self.lan and self.xfrm
        d = desired.compute(self.table.all(), self.cfg, self.lan.broadcast, self.slot_by_mark)
        self.last_desired = d
        for uid, reason in d.ignored.items():
            self._once(f"ignored {uid}", f"SA #{uid} ignored: {reason}", logging.WARNING)
        for warning in d.warnings:
            self._once(warning, warning, logging.WARNING)
        try:
            for slot, state in d.slots.items():
                if self.written.get(slot) != state.entry:
                    self.datapath.write_sa(slot, state.entry)
                    self.written[slot] = state.entry
            for slot in set(self.written) - set(d.slots):
                self.datapath.write_sa(slot, None)
                del self.written[slot]
            self.slot_by_mark = {st.entry.mark_in: slot for slot, st in d.slots.items()}
            if d.rules != self.rules_applied:
                self.rules.apply(d.rules)
                self.rules_applied = list(d.rules)
            if set(d.routes) != self.routes_applied:
                added, removed = links.sync_routes(d.routes, self.xfrm.index)
                for net in sorted(added, key=str):
                    log.info("route %s via %s", net, self.xfrm.name)
                for net in sorted(removed, key=str):
                    log.info("route %s removed", net)
                self.routes_applied = set(d.routes)
        except (netfilter.NetfilterError, links.LinkError, OSError) as exc:
            self.health.sync_errors += 1
            log.error("could not apply the desired state (will retry): %s", exc)
        self.write_state()

    def _once(self, key: str, message: str, level: int) -> None:
        if key not in self.reported:
            self.reported.add(key)
            log.log(level, "%s", message)

    def write_state(self) -> None:
        """Which SA each slot holds, for `status` (counters come from the pinned maps)."""
        slots = {}
        for slot, state in self.last_desired.slots.items():
            c = state.children[0]
            slots[str(slot)] = {
                "ike": c.ike_name,
                "child": c.child_name,
                "unique_id": c.unique_id,
                "ike_id": c.ike_id,
                "remote_id": c.remote_id,
                "remote_host": str(c.remote_host) if c.remote_host else None,
                "virtual_ips": [str(v) for v in c.remote_vips],
                "remote_ts": [str(t) for t in c.remote_ts],
                "mark_in": c.mark_in,
                "mark_out": c.mark_out,
                "spi_in": f"{c.spi_in:08x}",
                "spi_out": f"{c.spi_out:08x}",
                "reinject": state.entry.reinject,
                "selectors": [str(t) for t in state.entry.selectors],
            }
        doc = {
            "pid": os.getpid(),
            "pin_dir": str(self.cfg.pin_dir),
            "updated": time.time(),
            "vici_connected": self.health.vici_connected,
            "sync_errors": self.health.sync_errors,
            "ignored": {str(k): v for k, v in self.last_desired.ignored.items()},
            "slots": slots,
        }
        path = self.cfg.state_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, path)

    # -- the loop ---------------------------------------------------------------------------
    def _apply_changes(self, changes: list[Change]) -> None:
        for change in changes:
            log.info("%s", change.line())
            self.health.changes[change.kind] = self.health.changes.get(change.kind, 0) + 1

    def _status_line(self) -> str:
        vici = "VICI connected" if self.health.vici_connected else "VICI disconnected"
        return f"{len(self.last_desired.slots)} SAs forwarded, {vici}"

    def serve(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Follow strongSwan until `stop` is set; reconnect with back-off when it goes away."""
        attempt = 0
        ready_sent = False
        while not stop.is_set():
            stream = None
            try:
                stream = EventStream(self.cfg.vici_socket)
                changes = self.table.load_snapshot(list_sas(self.cfg.vici_socket))
                self.health.vici_connected, self.health.snapshots = True, self.health.snapshots + 1
                if attempt:
                    log.info("VICI reconnected: %d SAs in the snapshot", len(self.table))
                attempt = 0
                self.health.last_event = time.time()
                self._apply_changes(changes)
                self.reconcile()
                if not ready_sent:
                    # Programs attached and the snapshot applied: now, and only now, ready.
                    self.notifier.ready(self._status_line())
                    if on_ready:
                        on_ready()
                    ready_sent = True
                else:
                    self.notifier.status(self._status_line())
                last_sync = time.monotonic()
                for label, msg in stream:
                    if stop.is_set():
                        break
                    now = time.monotonic()
                    self.notifier.tick(now)
                    changes = []
                    if label is not None:
                        self.health.last_event = time.time()
                        try:
                            changes = self.table.apply(label, msg, now)
                        except PayloadError as exc:
                            log.error(
                                "bad VICI %s payload, taking a fresh snapshot: %s", label, exc
                            )
                            changes = self.table.load_snapshot(list_sas(self.cfg.vici_socket))
                    changes += self.table.expire(now)
                    if now - last_sync > RESYNC_S:
                        changes += self.table.load_snapshot(list_sas(self.cfg.vici_socket))
                        last_sync = now
                        self.reconcile()
                    if changes:
                        self._apply_changes(changes)
                        self.reconcile()
                        self.notifier.status(self._status_line())
            except ViciUnavailable as exc:
                self.health.vici_connected = False
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                attempt += 1
                log.warning("%s; retrying in %.1f s", exc, delay)
                if self.datapath is not None:
                    self.write_state()
                self.notifier.status(f"{exc}; retrying")
                deadline = time.monotonic() + delay
                while not stop.is_set() and time.monotonic() < deadline:
                    self.notifier.tick()
                    stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            finally:
                if stream is not None:
                    stream.close()

    # -- teardown ---------------------------------------------------------------------------
    def _unmount_bpffs(self) -> None:
        # Ours, and only while nobody pinned anything else there since.
        root = self.mounted_bpffs
        if root is not None and not any(root.iterdir()):
            subprocess.run(["umount", str(root)], check=False, capture_output=True)

    def teardown(self) -> None:
        """Remove everything this daemon created; safe after a partial set-up."""
        self.notifier.stopping()
        steps: list[tuple[str, Callable[[], object]]] = [
            (f"tc filter on ifindex {index}", partial(tc.detach, index))
            for index in reversed(self.attached)
        ]
        if self.metrics_server is not None:
            server = self.metrics_server
            steps.append(("metrics server", lambda: (server.shutdown(), server.server_close())))
        if self.rules is not None:
            steps.append(("MARK chains", self.rules.remove))
        if self.xfrm is not None:
            steps.append(("routes", partial(links.sync_routes, [], self.xfrm.index)))
        if self.groups is not None:
            steps.append(("group memberships", self.groups.close))
        if self.datapath is not None:
            steps.append(("programs and pinned maps", partial(self.datapath.close, unpin=True)))
        if self.xfrm is not None and self._xfrm_given is None:
            steps.append(("XFRM interface", partial(links.remove_xfrm, self.xfrm)))
        if self.mounted_bpffs is not None:
            steps.append(("bpffs mount", self._unmount_bpffs))
        steps.append(("state file", partial(self.cfg.state_file.unlink, missing_ok=True)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep going: leave as little behind as possible
                log.error("teardown: %s: %s", what, exc)
        self.attached.clear()
        self.rules = self.groups = self.datapath = self.metrics_server = None
        self.xfrm = self._xfrm_given
