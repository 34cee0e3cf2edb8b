"""Prometheus exporter: counters read from the BPF maps at scrape time.

Names follow the Prometheus naming guide (`forecast_` prefix, base units, `_total` counters).
Labels join with strongSwan's VICI exporters (`ike_name`, `child_name`) and name the client
(`remote_id`) and the SA by its inbound mark (`mark`), which a CHILD_SA rekey and a daemon restart
keep, so a series lives as long as the client's SA, not one rekey (a CHILD_SA's unique id
changes at every rekey: it is no label). Labels stay low-cardinality; never traffic-selector
strings. A gone SA's series disappear because each scrape yields only the SAs in the data
path now.

Series count: 6 per SA (`forecast_sa_packets_total` and `forecast_sa_bytes_total`, 3 directions
each), so 24,576 at 4,096 SAs, plus 6 per connection (`forecast_connection_*`, the sums over its
SAs) and about 30 fixed (12 of them `forecast_family_*`: 2 families, 3 directions).
`metrics_per_sa: false` drops the per-SA series and keeps the sums.
Per-SA drops (`forecast_sa_drops_total`, 4 reasons) appear only once an SA has dropped
something, so a quiet fleet pays nothing for them; their sums per connection are always there.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from forecast import __version__, layout
from forecast.layout import DIRECTION_NAMES, FAMILY_NAMES, DropReason
from forecast.local_out import RESULT_NAMES

if TYPE_CHECKING:
    from forecast.daemon import Daemon

SA_LABELS = ["ike_name", "child_name", "remote_id", "mark"]


APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class ApplyTimes:
    """How long applying SA changes to the kernel took: a histogram per trigger (an event
    burst, the snapshot at (re)connect, the periodic resync)."""

    buckets: dict[str, list[int]] = field(default_factory=dict)  # trigger → cumulative counts
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def observe(self, trigger: str, seconds: float) -> None:
        counts = self.buckets.setdefault(trigger, [0] * len(APPLY_BUCKETS))
        for i, bound in enumerate(APPLY_BUCKETS):
            if seconds <= bound:
                counts[i] += 1
        self.sums[trigger] = self.sums.get(trigger, 0.0) + seconds
        self.counts[trigger] = self.counts.get(trigger, 0) + 1


class ForecastCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        info = GaugeMetricFamily(
            "forecast_build_info",
            "forecast-bpf build; always 1. netfilter: the back end holding the MARK rules",
            labels=["version", "kernel", "netfilter"],
        )
        info.add_metric([__version__, platform.release(), d.rules.name if d.rules else ""], 1)
        yield info

        packets = CounterMetricFamily(
            "forecast_sa_packets",
            "Multicast/broadcast packets forwarded, per SA and direction",
            labels=[*SA_LABELS, "direction"],
        )
        nbytes = CounterMetricFamily(
            "forecast_sa_bytes",
            "Bytes (IP length) forwarded, per SA and direction",
            labels=[*SA_LABELS, "direction"],
        )
        conn_packets = CounterMetricFamily(
            "forecast_connection_packets",
            "Multicast/broadcast packets forwarded, summed over a connection's SAs",
            labels=["ike_name", "direction"],
        )
        conn_bytes = CounterMetricFamily(
            "forecast_connection_bytes",
            "Bytes (IP length) forwarded, summed over a connection's SAs",
            labels=["ike_name", "direction"],
        )
        sa_drops = CounterMetricFamily(
            "forecast_sa_drops",
            "Packets from (or copies to) an SA not forwarded, by reason: storm (over its rate), "
            "group_to_lan/group_to_sas (a group clients may not send to), clone",
            labels=[*SA_LABELS, "reason"],
        )
        conn_drops = CounterMetricFamily(
            "forecast_connection_drops",
            "forecast_sa_drops summed over a connection's SAs",
            labels=["ike_name", "reason"],
        )
        slots = dict(d.last_desired.slots)  # one consistent view for this scrape
        per_sa = d.cfg.metrics_per_sa
        sums: dict[tuple[str, str], list[int]] = {}
        drop_sums: dict[tuple[str, str], int] = {}
        if d.datapath is not None and slots:
            counters = d.datapath.counters(list(slots))
            dropped = d.datapath.sa_drops(list(slots))
            for slot, state in slots.items():
                child = state.children[0]
                labels = [child.ike_name, child.child_name, child.remote_id, f"{child.mark_in:#x}"]
                for sa_reason, n in dropped[slot].items():
                    if per_sa and n:
                        sa_drops.add_metric([*labels, sa_reason.name.lower()], n)
                    key = (child.ike_name, sa_reason.name.lower())
                    drop_sums[key] = drop_sums.get(key, 0) + n
                for direction, name in DIRECTION_NAMES.items():
                    t = counters[slot].by_direction[direction]
                    if per_sa:
                        packets.add_metric([*labels, name], t.packets)
                        nbytes.add_metric([*labels, name], t.bytes)
                    total = sums.setdefault((child.ike_name, name), [0, 0])
                    total[0] += t.packets
                    total[1] += t.bytes
        for (connection, name), (n_packets, n_bytes) in sorted(sums.items()):
            conn_packets.add_metric([connection, name], n_packets)
            conn_bytes.add_metric([connection, name], n_bytes)
        for (connection, reason_name), n in sorted(drop_sums.items()):
            conn_drops.add_metric([connection, reason_name], n)
        if per_sa:
            yield packets
            yield nbytes
            yield sa_drops
        yield conn_packets
        yield conn_bytes
        yield conn_drops

        fam_packets = CounterMetricFamily(
            "forecast_family_packets",
            "Multicast/broadcast packets forwarded, per address family and direction, over "
            "every SA the data path held",
            labels=["family", "direction"],
        )
        fam_bytes = CounterMetricFamily(
            "forecast_family_bytes",
            "Bytes (IP length) forwarded, per address family and direction",
            labels=["family", "direction"],
        )
        if d.datapath is not None:
            for family, by_dir in d.datapath.family_counters().items():
                for direction, name in DIRECTION_NAMES.items():
                    labels = [FAMILY_NAMES[family], name]
                    fam_packets.add_metric(labels, by_dir[direction].packets)
                    fam_bytes.add_metric(labels, by_dir[direction].bytes)
        yield fam_packets
        yield fam_bytes

        drops = CounterMetricFamily(
            "forecast_drops", "Packets not forwarded, by reason", labels=["reason"]
        )
        if d.datapath is not None:
            for reason, n in d.datapath.drops().items():
                drops.add_metric([reason.name.lower()], n)
        else:
            for reason in DropReason:
                drops.add_metric([reason.name.lower()], 0)
        yield drops
        yield CounterMetricFamily(
            "forecast_lost_after_datapath",
            "Copies handed to the XFRM interface that it could not send (its TX errors since "
            "the daemon started): a full queue after encryption or no matching policy",
            value=d.lost.count,
        )

        local = CounterMetricFamily(
            "forecast_local_out_copies",
            "Copies for mark-only SAs sent from the daemon's raw socket, by result: sent; "
            "not_live (its SA had gone); refused (a guard dropped it: no IPsec policy); "
            "too_large, unreachable, no_buffer, other (the send failed); unsupported (IPv6)",
            labels=["result"],
        )
        summary = d.local_out.summary() if d.local_out is not None else None
        for name in RESULT_NAMES.values():
            local.add_metric([name], summary.copies[name] if summary else 0)
        yield local
        yield GaugeMetricFamily(
            "forecast_local_out_queued_bytes",
            "Bytes of copies queued for the daemon's raw socket and not yet sent",
            value=summary.queued_bytes if summary else 0,
        )
        yield GaugeMetricFamily(
            "forecast_local_out_sas",
            "SAs on the local output path (mark only, no if_id)",
            value=sum(st.entry.local_out for st in slots.values()),
        )

        h = d.health
        yield GaugeMetricFamily(
            "forecast_vici_connected",
            "1 while the daemon follows charon over VICI",
            value=1 if h.vici_connected else 0,
        )
        yield GaugeMetricFamily("forecast_sas", "SAs in the data path", value=len(slots))
        yield GaugeMetricFamily(
            "forecast_sa_table_capacity", "SA slots the data path has", value=layout.FC_MAX_SAS
        )
        yield GaugeMetricFamily(
            "forecast_sas_left_out",
            "SAs that get no forwarding because the SA table is full",
            value=len(d.last_desired.left_out),
        )
        yield GaugeMetricFamily(
            "forecast_ignored_sas",
            "CHILD_SAs left alone (no mark, another if_id, or mark-only with mark_only_sas: "
            "ignore)",
            value=len(d.last_desired.ignored),
        )
        yield GaugeMetricFamily(
            "forecast_last_vici_event_timestamp_seconds",
            "When the last VICI event or snapshot arrived (Unix time)",
            value=h.last_event or h.started,
        )
        yield CounterMetricFamily(
            "forecast_sync_errors",
            "Failed attempts to apply rules, routes or map entries",
            value=h.sync_errors,
        )
        apply = HistogramMetricFamily(
            "forecast_apply_seconds",
            "Time to bring the kernel (slots, lists, rules, routes) in step with the SA table, "
            "by trigger: an event burst, the snapshot at (re)connect, the periodic resync",
            labels=["trigger"],
        )
        times = h.apply
        for trigger in sorted(times.buckets):
            cumulative = [
                (f"{bound:g}", n)
                for bound, n in zip(APPLY_BUCKETS, times.buckets[trigger], strict=True)
            ]
            cumulative.append(("+Inf", times.counts[trigger]))
            apply.add_metric([trigger], cumulative, times.sums[trigger])
        yield apply
        changes = CounterMetricFamily(
            "forecast_sa_changes", "SA table changes, by kind", labels=["kind"]
        )
        for kind in ("added", "rekeyed", "moved", "removed", "retired"):
            changes.add_metric([kind], h.changes.get(kind, 0))
        yield changes


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def serve(daemon: Daemon, address: str) -> tuple[threading.Thread, object]:
    """Start the exporter on `address` (HOST:PORT) in a thread; returns (thread, server)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ForecastCollector(daemon))
    host, port = parse_address(address)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return thread, server
