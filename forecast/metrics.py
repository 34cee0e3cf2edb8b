"""Prometheus exporter: counters read from the BPF maps at scrape time.

Names follow the Prometheus naming guide (`forecast_` prefix, base units, `_total` counters).
Labels stay low-cardinality: connection, child and CHILD_SA unique id; never traffic-selector
strings. A gone SA's series disappear because each scrape yields only the SAs in the data
path now.

Series count: 6 per SA (`forecast_sa_packets_total` and `forecast_sa_bytes_total`, 3 directions
each), so 24,576 at 4,096 SAs, plus 6 per connection (`forecast_connection_*`, the sums over its
SAs) and about 20 fixed. `metrics_per_sa: false` drops the per-SA series and keeps the sums.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from forecast import __version__, layout
from forecast.layout import Direction, DropReason

if TYPE_CHECKING:
    from forecast.daemon import Daemon

DIRECTIONS = {
    Direction.LAN_TO_SA: "lan_to_sa",
    Direction.SA_TO_LAN: "sa_to_lan",
    Direction.SA_TO_SA: "sa_to_sa",
}
SA_LABELS = ["connection", "child", "unique_id"]


class ForecastCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        info = GaugeMetricFamily(
            "forecast_build_info", "forecast-bpf build; always 1", labels=["version", "kernel"]
        )
        info.add_metric([__version__, platform.release()], 1)
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
            labels=["connection", "direction"],
        )
        conn_bytes = CounterMetricFamily(
            "forecast_connection_bytes",
            "Bytes (IP length) forwarded, summed over a connection's SAs",
            labels=["connection", "direction"],
        )
        slots = dict(d.last_desired.slots)  # one consistent view for this scrape
        per_sa = d.cfg.metrics_per_sa
        sums: dict[tuple[str, str], list[int]] = {}
        if d.datapath is not None and slots:
            counters = d.datapath.counters(list(slots))
            for slot, state in slots.items():
                child = state.children[0]
                labels = [child.ike_name, child.child_name, str(child.unique_id)]
                for direction, name in DIRECTIONS.items():
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
        if per_sa:
            yield packets
            yield nbytes
        yield conn_packets
        yield conn_bytes

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
            "forecast_ignored_sas",
            "CHILD_SAs left alone (no mark or another if_id)",
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
        changes = CounterMetricFamily(
            "forecast_sa_changes", "SA table changes, by kind", labels=["kind"]
        )
        for kind in ("added", "rekeyed", "removed", "retired"):
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
