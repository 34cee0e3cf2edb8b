"""The daemon: observe (VICI) → desire (pure) → act (maps, rules, routes), until stopped.

Set-up adopts or builds what does not depend on SAs (programs, XFRM interface, groups, our
chains); every VICI snapshot or event then reconciles the SA-dependent state. What was applied
is remembered to keep events cheap, but the kernel is the truth: set-up starts from what the
maps hold, and every resync reads slots, rules, routes and filters back and repairs them.

Two ways out (ExitMode): STOP removes everything the daemon created, in reverse order;
HANDOVER (a restart, an upgrade) leaves the data path forwarding for the next daemon to adopt.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from forecast import bpf_build, config, desired, links, metrics, netfilter, tc
from forecast.config import Config
from forecast.datapath import Datapath, DatapathConfig, SaEntry, remove_pins
from forecast.layout import FC_MAX_SAS
from forecast.local_out import LocalOutSender
from forecast.sa import Change, PayloadError, SaTable
from forecast.systemd import Notifier, listen_fds, process_age
from forecast.vici_source import BACKOFF_S, EventStream, ViciUnavailable, list_sas

RESYNC_S = 30.0  # a fresh snapshot and a kernel read-back this often: drift lives no longer
BATCH_S = 0.5  # events waiting back to back are applied together, for at most this long
RELOADABLE = (
    "groups",
    "groups6",
    "client_groups",
    "storm_guard",
    "reinject",
    "log_level",
    "metrics_per_sa",
)
# Reloading any of these rewrites the data path's configuration map.
DATAPATH_KEYS = ("groups", "groups6", "client_groups", "storm_guard")
# Per family: the config key of its LAN groups, which is also the FDNAME of its membership
# socket in systemd's store and its key in the state file.
MEMBERSHIPS = {4: "groups", 6: "groups6"}
log = logging.getLogger("forecast-bpf")


@lru_cache(maxsize=2 * FC_MAX_SAS)
def _slot_doc(state: desired.SlotState) -> dict[str, Any]:
    """What `status` shows of a slot (cached: the same SA gives the same document)."""
    c = state.children[0]
    return {
        "ike": c.ike_name,
        "child": c.child_name,
        "unique_id": c.unique_id,
        "ike_id": c.ike_id,
        "remote_id": c.remote_id,
        "remote_host": str(c.remote_host) if c.remote_host else None,
        "remote_port": c.remote_port,
        "udp_encap": c.encap,
        "virtual_ips": [str(v) for v in c.remote_vips],
        "remote_ts": [str(t) for t in c.remote_ts],
        "mark_in": c.mark_in,
        "mark_out": c.mark_out,
        "spi_in": f"{c.spi_in:08x}",
        "spi_out": f"{c.spi_out:08x}",
        "reinject": state.entry.reinject,
        "selectors": [str(t) for t in state.entry.selectors],
        "path": desired.PATH_LOCAL_OUT if state.entry.local_out else desired.PATH_XFRM,
    }


def read_state_file(path: Path) -> dict[str, Any]:
    """What a previous daemon left there (a restart, a crash); empty when nothing usable."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def unmount_if_empty(root: Path) -> bool:
    """Undo a bpffs mount of ours, only while nobody else pinned anything there since."""
    if any(root.iterdir()):
        return False
    return subprocess.run(["umount", str(root)], check=False, capture_output=True).returncode == 0


class ExitMode(enum.Enum):
    STOP = "stop"  # remove everything
    HANDOVER = "handover"  # leave the data path forwarding for the next daemon


@dataclass
class LostCopies:
    """TX errors of the XFRM interface: copies handed over by the data path that never left."""

    baseline: int | None = None  # what the interface had when this daemon first looked
    seen: int = 0
    checked: float = -1e9
    warned: float = -1e9

    @property
    def count(self) -> int:
        return self.seen - self.baseline if self.baseline is not None else 0


@dataclass
class Health:
    vici_connected: bool = False
    last_event: float | None = None
    sync_errors: int = 0
    started: float = field(default_factory=time.time)
    changes: dict[str, int] = field(default_factory=dict)  # kind → count, for churn
    apply: metrics.ApplyTimes = field(default_factory=lambda: metrics.ApplyTimes())


class Daemon:
    def __init__(
        self,
        cfg: Config,
        *,
        xfrm: links.XfrmInterface | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path  # re-read on reload
        self.table = SaTable()
        self.health = Health()
        self._xfrm_given = xfrm
        self.xfrm: links.XfrmInterface | None = xfrm
        self.lan: links.LanInterface | None = None
        self.wan_index = 0  # the device mark-only SAs' traffic arrives on (the XFRM's lower)
        self.local_out: LocalOutSender | None = None  # mark-only SAs' copies, when served
        self.local_out_sas = 0  # what the data path's config says (n_local_out)
        self.datapath: Datapath | None = None
        self.rules: netfilter.RuleSet | None = None
        self.memberships: dict[int, links.GroupMemberships] = {}
        self.bpffs_mounted: Path | None = None  # by this daemon or the one it took over from
        self.hooks: dict[str, int] = {}  # role → ifindex of the device its filter sits on
        self.swap_pending: set[str] = set()  # roles whose new program waits for filled maps
        # What was last applied, so an event changes only the difference; set-up and every
        # resync refresh it from the kernel.
        self.slot_by_mark: dict[int, int] = {}
        self.written: dict[int, SaEntry] = {}
        self.rules_applied: list[desired.MarkRule] | None = None
        self.routes_applied: set[links.Network] | None = None
        self.reported: set[str] = set()
        self.last_desired = desired.Desired()
        self.notifier = Notifier()
        self.metrics_server: Any = None
        self.reload_requested = threading.Event()
        self.timings: dict[str, float] = {}  # start-up phases, for the READY log line
        self.lost = LostCopies()

    # -- set-up -----------------------------------------------------------------------------
    def setup(self) -> None:
        t0 = time.monotonic()
        with self.notifier.keepalive():
            self._setup()
        self.timings["set-up"] = time.monotonic() - t0

    def _setup(self) -> None:
        cfg = self.cfg
        previous = read_state_file(cfg.state_file)
        inherited = cfg.pin_dir.is_dir() and any(cfg.pin_dir.iterdir())
        try:
            bpffs_root = cfg.pin_dir.parent
            if bpf_build.ensure_bpffs(bpffs_root):
                self.bpffs_mounted = bpffs_root
                log.info("mounted bpffs at %s (unmounted again at stop)", bpffs_root)
            elif previous.get("bpffs_mounted") == str(bpffs_root):
                self.bpffs_mounted = bpffs_root
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
                    "ours" if self.xfrm.created else "the operator's: kept at stop",
                )
            self.wan_index = self._wan_index()
            self._load_datapath()
            self._attach_filters()
            self._join_groups(previous)
            self.rules = netfilter.choose(cfg.netfilter)
            log.info("netfilter back end: %s", self.rules.detail)
            try:
                _thread, self.metrics_server = metrics.serve(self, cfg.metrics_address)
            except OSError as exc:
                raise links.LinkError(
                    f"metrics_address {cfg.metrics_address}: {exc.strerror or exc}"
                ) from None
            log.info("metrics on http://%s/metrics", cfg.metrics_address)
        except BaseException:
            # A failed start removes what it made, but never a data path it found forwarding:
            # that stays for the next try (or for `forecast-bpf stop`).
            self.teardown(ExitMode.HANDOVER if inherited else ExitMode.STOP)
            raise

    def _wan_index(self) -> int:
        """The device mark-only SAs' traffic arrives on: the XFRM interface's (xfrm.dev or the
        default route's). 0: none, so no local output path (said once)."""
        if self.cfg.mark_only_sas != desired.PATH_LOCAL_OUT:
            return 0
        try:
            return socket.if_nametoindex(self.cfg.xfrm.dev or links.default_route_device())
        except (OSError, links.LinkError) as exc:
            log.warning("mark-only SAs left alone (no local output path): %s", exc)
            self.cfg = dataclasses.replace(self.cfg, mark_only_sas="ignore")
            return 0

    def _datapath_config(self) -> DatapathConfig:
        assert self.lan and self.xfrm
        clients = config.client_groups_for(self.cfg)
        return DatapathConfig(
            xfrm_ifindex=self.xfrm.index,
            lan_ifindex=self.lan.index,
            lan_mac=self.lan.mac,
            lan_broadcast=self.lan.broadcast,
            groups=config.lan_groups(self.cfg),
            client_groups_to_lan=clients.to_lan,
            client_groups_to_sas=clients.to_clients,
            lan_rate=self.cfg.storm_guard.lan,
            sa_rate=self.cfg.storm_guard.per_sa,
            local_out_sas=self.local_out_sas,
        )

    def _load_datapath(self) -> None:
        assert self.lan and self.xfrm
        self.datapath = dp = Datapath(self.cfg.pin_dir)
        t0 = time.monotonic()
        dp.load()
        if dp.compiled:
            log.info("programs build %s compiled in %.1f s", dp.digest, time.monotonic() - t0)
        else:
            log.info("programs build %s adopted from %s (no compile)", dp.digest, self.cfg.pin_dir)
        dp.write_config(self._datapath_config())
        # The kernel's slots, not an empty memory: a slot whose SA went away while no daemon
        # ran is cleared by the first reconcile, one that is still there keeps its counters.
        self.written = dp.read_slots()
        self.slot_by_mark = {entry.mark_in: slot for slot, entry in self.written.items()}
        if self.written:
            log.info("adopted %d SA slots from the pinned maps", len(self.written))
        self.hooks = {"lan": self.lan.index, "tunnel": self.xfrm.index}
        if self.wan_index and self.wan_index != self.lan.index:
            # Mark-only SAs' decrypted traffic arrives on the WAN device; their copies leave
            # from a raw socket, sent once the first reconcile has put their guards in place.
            try:
                self.local_out = LocalOutSender(dp.maps_dir, self.wan_index)
            except PermissionError as exc:
                # A unit without CAP_NET_RAW: the XFRM-interface path needs no raw socket.
                log.warning("mark-only SAs left alone (no local output path): %s", exc)
                self.cfg = dataclasses.replace(self.cfg, mark_only_sas="ignore")
            else:
                self.hooks["wan"] = self.wan_index

    def _attach_filters(self) -> None:
        dp = self.datapath
        assert dp is not None
        for role, ifindex in self.hooks.items():
            current = tc.our_filter(ifindex)
            want = dp.filter_name(role)
            if current == want and not dp.compiled:
                log.info("filter %s on ifindex %d kept (forwarding never stopped)", want, ifindex)
            elif current is not None and dp.fresh_maps:
                # New maps are empty until the first snapshot is written into them; the old
                # program keeps forwarding with the old maps until then.
                self.swap_pending.add(role)
            else:
                tc.attach(ifindex, dp.fd_for(role), want)
                log.info(
                    "filter %s on ifindex %d %s",
                    want,
                    ifindex,
                    f"swapped in for {current}" if current else "attached",
                )
        if not self.swap_pending:
            self._prune()

    def _swap_pending_filters(self) -> None:
        dp = self.datapath
        assert dp is not None
        for role in sorted(self.swap_pending):
            tc.attach(self.hooks[role], dp.fd_for(role), dp.filter_name(role))
            log.info("filter %s swapped in (maps filled)", dp.filter_name(role))
        self.swap_pending.clear()
        self._prune()

    def _prune(self) -> None:
        assert self.datapath is not None
        for path in self.datapath.prune():
            log.info("unpinned %s (a previous build)", path.name)

    def _join_groups(self, previous: dict[str, Any]) -> None:
        assert self.lan is not None
        passed = listen_fds()
        for family, key in MEMBERSHIPS.items():
            stored = passed.get(key)
            sock = socket.socket(fileno=stored) if stored is not None else None
            held = [ip_address(g) for g in previous.get(key, [])] if sock else []
            try:
                self.memberships[family] = links.GroupMemberships(
                    self.lan, getattr(self.cfg, key), family=family, sock=sock, held=held
                )
            except links.LinkError as exc:
                if family == 4:
                    raise
                # A LAN without IPv6 has no IPv6 discovery to forward; IPv4 goes on.
                log.warning(
                    "%s; IPv6 groups not joined (a snooping switch may keep them away)", exc
                )
                continue
            if sock is not None:
                log.info("IPv%d group memberships taken over from the previous daemon", family)

    # -- reconcile --------------------------------------------------------------------------
    def reconcile(self, *, from_kernel: bool = False) -> None:
        """Converge the kernel to the SA table. from_kernel: first read back what the kernel
        really holds (slots, our chains, routes, filters) instead of trusting memory."""
        assert self.datapath and self.rules and self.lan and self.xfrm
        if from_kernel:
            self._read_back()
        d = desired.compute(
            self.table.all(), self.cfg, self.lan.broadcast, self.slot_by_mark, set(self.written)
        )
        self.last_desired = d
        for uid, reason in d.ignored.items():
            self._once(f"ignored {uid}", f"SA #{uid} ignored: {reason}", logging.WARNING)
        for warning in d.warnings:
            self._once(warning, warning, logging.WARNING)
        freed = set(self.written) - set(d.slots)
        marks = [time.monotonic()]  # where an apply spends its time (debug log)
        try:
            dp = self.datapath
            if self.local_out is not None:
                # No copy of a going SA from here on: its guard may go below.
                self.local_out.retain(d.local_out_marks)
            local_out_sas = sum(st.entry.local_out for st in d.slots.values())
            if local_out_sas != self.local_out_sas:
                self.local_out_sas = local_out_sas
                dp.write_config(self._datapath_config())
            for slot, state in d.slots.items():
                if self.written.get(slot) != state.entry:
                    dp.write_sa(slot, state.entry)
                    self.written[slot] = state.entry
            # A slot is listed only once filled, and cleared only once unlisted (the publish
            # returns when no packet walks the old lists any more).
            dp.publish_targets({slot: st.entry for slot, st in d.slots.items()})
            for slot in freed:
                dp.write_sa(slot, None)
                del self.written[slot]
            self.slot_by_mark = {st.entry.mark_in: slot for slot, st in d.slots.items()}
            if self.swap_pending:
                self._swap_pending_filters()
            marks.append(time.monotonic())
            if d.rules != self.rules_applied:
                whole = self.rules_applied is None
                self.rules.apply(d.rules, known=self.rules_applied)
                self.rules_applied = list(d.rules)
                if whole:
                    self._clear_other_backends()
            if self.local_out is not None:
                # Every guard in place: these marks' copies may go.
                self.local_out.allow(d.local_out_marks)
                if not self.local_out.started:
                    self.local_out.start()
            marks.append(time.monotonic())
            if self.routes_applied is None or set(d.routes) != self.routes_applied:
                added, removed = links.sync_routes(
                    d.routes, self.xfrm.index, known=self.routes_applied
                )
                if len(added) + len(removed) > 10:  # a start, a storm: one line, not thousands
                    log.info(
                        "routes via %s: %d added, %d removed",
                        self.xfrm.name,
                        len(added),
                        len(removed),
                    )
                else:
                    for net in sorted(added, key=str):
                        log.info("route %s via %s", net, self.xfrm.name)
                    for net in sorted(removed, key=str):
                        log.info("route %s removed", net)
                self.routes_applied = set(d.routes)
            marks.append(time.monotonic())
            log.debug(
                "applied: data path %.1f ms, rules %.1f ms, routes %.1f ms",
                *((b - a) * 1000 for a, b in itertools.pairwise(marks)),
            )
        except (netfilter.NetfilterError, links.LinkError, OSError, RuntimeError) as exc:
            self.health.sync_errors += 1
            log.error("could not apply the desired state (will retry): %s", exc)
            self.rules_applied = self.routes_applied = None  # read back at the next try
            freed = set()
        self.write_state()
        if d.waiting and freed:
            self.reconcile()  # the slots just cleared are free now

    def _clear_other_backends(self) -> None:
        """Rules the other back end holds (a previous version's, a changed `netfilter`) go
        once ours are in: the marks were never missing meanwhile."""
        assert self.rules
        for other in netfilter.others(self.rules):
            if other.present():
                other.remove()
                log.info("removed the MARK rules left in %s", other.detail)

    def _read_back(self) -> None:
        """Replace what memory says was applied by what the kernel holds; log any drift."""
        assert self.datapath and self.rules and self.datapath.targets
        kernel_slots = self.datapath.read_slots()
        if kernel_slots != self.written:
            log.warning("SA slots in the kernel differ from the last write: repairing")
        self.written = kernel_slots
        self.slot_by_mark = {entry.mark_in: slot for slot, entry in kernel_slots.items()}
        self.datapath.targets.read()
        if self.rules_applied is not None and not self.rules.holds(
            Counter(map(netfilter.signature, self.rules_applied))
        ):
            log.warning("our MARK rules were changed by someone else: rewriting them")
            self.rules_applied = None
        self.routes_applied = None  # sync_routes reads the kernel's routes itself
        dp = self.datapath
        for role, ifindex in self.hooks.items():
            if role not in self.swap_pending and tc.our_filter(ifindex) != dp.filter_name(role):
                log.warning("filter on ifindex %d is gone or foreign: attaching it again", ifindex)
                tc.attach(ifindex, dp.fd_for(role), dp.filter_name(role))

    # -- reload -----------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the config file; apply what can change without a restart (RELOADABLE)."""
        self.notifier.reloading()
        try:
            if self.config_path is None:
                raise config.ConfigError("no config file to re-read")
            new = config.load(self.config_path)
        except config.ConfigError as exc:
            log.error("reload failed, the running configuration stays: %s", exc)
            self.notifier.ready(self._status_line())
            return
        old = self.cfg
        changed = [
            f.name
            for f in dataclasses.fields(Config)
            if getattr(new, f.name) != getattr(old, f.name)
        ]
        for key in changed:
            if key not in RELOADABLE:
                log.warning("reload: %s changed; it takes effect at the next restart", key)
        self.cfg = dataclasses.replace(
            old, **{key: getattr(new, key) for key in changed if key in RELOADABLE}
        )
        logging.getLogger().setLevel(self.cfg.log_level.upper())
        for family, key in MEMBERSHIPS.items():
            held = self.memberships.get(family)
            if key in changed and held is not None and self.datapath is not None:
                joined, left = held.set(getattr(self.cfg, key))
                log.info(
                    "%s now %s (joined %s, left %s)",
                    key,
                    ", ".join(map(str, getattr(self.cfg, key))) or "none",
                    ", ".join(map(str, joined)) or "none",
                    ", ".join(map(str, left)) or "none",
                )
        if set(changed) & set(DATAPATH_KEYS) and self.datapath is not None:
            self.datapath.write_config(self._datapath_config())
        self.reconcile()
        log.info("reloaded %s: %s", self.config_path, ", ".join(changed) or "nothing changed")
        self.notifier.ready(self._status_line())

    def _once(self, key: str, message: str, level: int) -> None:
        if key not in self.reported:
            self.reported.add(key)
            log.log(level, "%s", message)

    def write_state(self) -> None:
        """Which SA each slot holds, for `status` (counters come from the pinned maps), and what
        the next daemon needs to take over (groups held, a bpffs mount to undo at stop)."""
        slots = {str(slot): _slot_doc(state) for slot, state in self.last_desired.slots.items()}
        dp = self.datapath
        doc = {
            "pid": os.getpid(),
            "pin_dir": str(self.cfg.pin_dir),
            "maps_dir": str(dp.maps_dir) if dp else None,
            "filters": {
                role: {"ifindex": ifindex, "name": dp.filter_name(role)}
                for role, ifindex in self.hooks.items()
            }
            if dp
            else {},
            **{
                key: [str(g) for g in held.groups] if (held := self.memberships.get(f)) else []
                for f, key in MEMBERSHIPS.items()
            },
            "bpffs_mounted": str(self.bpffs_mounted) if self.bpffs_mounted else None,
            "updated": time.time(),
            "vici_connected": self.health.vici_connected,
            "sync_errors": self.health.sync_errors,
            "netfilter": self.rules.detail if self.rules else None,
            "lost_after_datapath": self.lost.count,
            "ignored": {str(k): v for k, v in self.last_desired.ignored.items()},
            "local_out": self.local_out is not None,
            "slots": slots,
        }
        path = self.cfg.state_file
        # Root's alone (it names every peer), whatever umask the daemon was started with.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # Compact: at thousands of SAs, indenting costs 4x the time and 1.5x the bytes per event.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # a .tmp left by an older daemon keeps its mode otherwise
            f.write(json.dumps(doc, separators=(",", ":")))
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
                t_snapshot = time.monotonic()
                stream = EventStream(self.cfg.vici_socket)
                changes = self.table.load_snapshot(list_sas(self.cfg.vici_socket))
                self.health.vici_connected = True
                if attempt:
                    log.info("VICI reconnected: %d SAs in the snapshot", len(self.table))
                attempt = 0
                self.health.last_event = time.time()
                self._apply_changes(changes)
                self._timed_reconcile("snapshot", from_kernel=True)
                self.timings["snapshot"] = time.monotonic() - t_snapshot
                if not ready_sent:
                    # Programs attached and the snapshot applied: now, and only now, ready.
                    self.notifier.ready(self._status_line())
                    log.info(
                        "ready: %s, %.2f s after the process started (%s)",
                        self._status_line(),
                        process_age(),
                        ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()),
                    )
                    if on_ready:
                        on_ready()
                    ready_sent = True
                else:
                    self.notifier.status(self._status_line())
                last_sync = time.monotonic()
                pending: list[Change] = []  # applied to the table, not yet to the kernel
                batch_started = 0.0
                for label, msg in stream:
                    if stop.is_set():
                        break
                    now = time.monotonic()
                    self.notifier.tick(now)
                    self._reload_if_asked()
                    self._watch_lost_copies(now)
                    if label is not None:
                        self.health.last_event = time.time()
                        if not pending:
                            batch_started = now
                        try:
                            pending += self.table.apply(label, msg, now)
                        except PayloadError as exc:
                            log.error(
                                "bad VICI %s payload, taking a fresh snapshot: %s", label, exc
                            )
                            pending += self.table.load_snapshot(list_sas(self.cfg.vici_socket))
                        # A burst (a reconnect storm, a gateway restart) is applied in one
                        # step: one list flip and one netfilter commit for all of it.
                        if stream.ready() and now - batch_started < BATCH_S:
                            continue
                    changes, pending = pending + self.table.expire(now), []
                    if changes:
                        self._apply_changes(changes)
                        self._timed_reconcile("event")
                    # The resync lists every SA (a VICI round trip that grows with the table):
                    # never ahead of an event's changes, and not while events wait, unless it
                    # is twice overdue.
                    overdue = now - last_sync
                    if overdue > RESYNC_S and (not stream.ready() or overdue > 2 * RESYNC_S):
                        resynced = self.table.load_snapshot(list_sas(self.cfg.vici_socket))
                        last_sync = time.monotonic()
                        self._apply_changes(resynced)
                        self._timed_reconcile("resync", from_kernel=True)
                        changes += resynced
                    if changes:
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
                    self._reload_if_asked()
                    stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            finally:
                if stream is not None:
                    stream.close()

    def _watch_lost_copies(self, now: float) -> None:
        """Copies the data path counted as sent but the kernel could not transmit show up as
        TX errors of the XFRM interface: count them, and say so (at most once a minute) with
        what to do. Read at most once a second."""
        if self.xfrm is None or now - self.lost.checked < 1.0:
            return
        self.lost.checked = now
        try:
            errors = links.tx_errors(self.xfrm.index)
        except (OSError, RuntimeError):
            return
        if self.lost.baseline is None:
            self.lost.baseline = self.lost.seen = errors  # the interface's, before this daemon
        if errors > self.lost.seen and now - self.lost.warned >= 60:
            log.warning(
                "%d copies lost after the data path since start (TX errors on %s): a queue "
                "after encryption overflowed or no policy matched; at %d SAs, "
                "net.core.netdev_max_backlog and the WAN device's txqueuelen should be at "
                "least twice that (docs/design.md, Lost after the data path)",
                errors - self.lost.baseline,
                self.xfrm.name,
                len(self.last_desired.slots),
            )
            self.lost.warned = now
        changed = errors != self.lost.seen
        self.lost.seen = errors
        if changed:
            self.write_state()  # `status` shows the count without waiting for an SA event

    def _timed_reconcile(self, trigger: str, *, from_kernel: bool = False) -> None:
        t0 = time.monotonic()
        self.reconcile(from_kernel=from_kernel)
        self.health.apply.observe(trigger, time.monotonic() - t0)

    def _reload_if_asked(self) -> None:
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self.reload()

    # -- teardown ---------------------------------------------------------------------------
    def _hand_over_groups(self) -> None:
        for family, held in self.memberships.items():
            if self.notifier.store_fd(MEMBERSHIPS[family], held.sock.fileno()):
                log.info("IPv%d group memberships kept in systemd's file-descriptor store", family)
            held.close()

    def teardown(self, mode: ExitMode = ExitMode.STOP) -> None:
        """STOP: remove everything this daemon created (safe after a partial set-up).
        HANDOVER: let go of the data path and leave it forwarding."""
        final = mode is ExitMode.STOP
        self.notifier.stopping(
            "stopping: removing filters, rules, routes, maps"
            if final
            else "restarting: the data path keeps forwarding"
        )
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.local_out is not None:
            sender = self.local_out
            # Copies still queued stay in the pinned ring for the next daemon (a hand-over).
            steps.append(("local-output sender", sender.stop))
        if self.metrics_server is not None:
            server = self.metrics_server
            steps.append(("metrics server", lambda: (server.shutdown(), server.server_close())))
        if not final:
            if self.memberships:
                steps.append(("group memberships", self._hand_over_groups))
            if self.datapath is not None:
                steps.append(("map descriptors", self.datapath.close))
                steps.append(("state file", self.write_state))
        else:
            steps += [
                (f"tc filter on ifindex {index}", partial(tc.detach, index))
                for index in reversed(self.hooks.values())
            ]
            if self.rules is not None:
                steps.append(("MARK rules", self.rules.remove))
            if self.xfrm is not None:
                steps.append(("routes", partial(links.sync_routes, [], self.xfrm.index)))
            for family, held in self.memberships.items():
                key = MEMBERSHIPS[family]
                steps.append((f"stored {key}", partial(self.notifier.drop_fd, key)))
                steps.append((f"{key} memberships", held.close))
            if self.datapath is not None:
                steps.append(("programs and pinned maps", self.datapath.remove))
            if self.xfrm is not None and self._xfrm_given is None:
                steps.append(("XFRM interface", partial(links.remove_xfrm, self.xfrm)))
            if self.bpffs_mounted is not None:
                steps.append(("bpffs mount", partial(unmount_if_empty, self.bpffs_mounted)))
            steps.append(("state file", partial(self.cfg.state_file.unlink, missing_ok=True)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep going: leave as little behind as possible
                log.error("teardown: %s: %s", what, exc)
        self.hooks.clear()
        self.memberships = {}
        self.local_out = None
        self.rules = self.datapath = self.metrics_server = None
        self.xfrm = self._xfrm_given


def remove_left_datapath(cfg: Config) -> list[str]:
    """What a STOP removes, for a data path whose daemon is gone (a hand-over without a
    successor, a crash). The state file it left names its filters; the rest is found by what
    marks it as ours: the chains' names, the route protocol, the interface alias, the pins."""
    removed: list[str] = []
    state = read_state_file(cfg.state_file)
    xfrm = links.lookup_xfrm(cfg.xfrm.name)
    hooks = {int(f["ifindex"]) for f in state.get("filters", {}).values()}
    hooks |= {xfrm.index} if xfrm else set()
    for ifindex in sorted(hooks):
        if tc.our_filter(ifindex) and tc.detach(ifindex):
            removed.append(f"tc filter on ifindex {ifindex}")
    removed += netfilter.remove_all()
    _added, routes = links.sync_routes([], 0)
    removed += [f"route {net}" for net in sorted(routes, key=str)]
    if cfg.pin_dir.exists():
        remove_pins(cfg.pin_dir)
        removed.append(f"pins in {cfg.pin_dir}")
    if xfrm is not None and xfrm.created:
        links.remove_xfrm(xfrm)
        removed.append(f"XFRM interface {xfrm.name}")
    mounted = state.get("bpffs_mounted")
    if mounted and unmount_if_empty(Path(mounted)):
        removed.append(f"bpffs mount {mounted}")
    if cfg.state_file.exists():
        cfg.state_file.unlink()
        removed.append("state file")
    return removed
