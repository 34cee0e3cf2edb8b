"""The local-output path: copies for mark-only SAs, sent from a raw socket with the SA's mark.

A mark-only SA (strongSwan's documented plugin configuration: `mark = %unique`, no if_id) has
policies that only a packet taking the local output path can match, so a TC clone cannot reach
it. The programs still classify, pick the targets and count; for such a target they queue the
packet with its mark in a pinned ring buffer (`local_out`), and this module sends each copy:
IP_HDRINCL (the packet as it was, TTL and source kept), SO_MARK = the SA's outbound mark, and
IP_PKTINFO naming the WAN device and the packet's own source, so the policy lookup sees the
packet's source and not the route's (docs/design.md, The local-output path).

Never in clear: a copy goes out only for a mark whose guard rule is in place (desired.py: a
POSTROUTING rule that drops multicast/broadcast with that mark leaving without IPsec), and the
control plane takes a mark out of `live` before it removes its guard. The ring is pinned:
copies queued while no daemon runs are sent by the next one.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import select
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from forecast import layout
from forecast.layout import LocalResult
from forecast.pinned import PinnedMap, obj_get

log = logging.getLogger("forecast.local_out")

SO_MARK = getattr(socket, "SO_MARK", 36)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
RINGBUF_BUSY = 1 << 31
RINGBUF_DISCARD = 1 << 30
RINGBUF_HEADER = 8
POLL_S = 0.5
# What a send's error means, for counters and the log.
ERRORS = {
    errno.EPERM: LocalResult.REFUSED,  # a guard rule dropped it: the SA's policy is gone
    errno.EMSGSIZE: LocalResult.TOO_LARGE,  # over the path's MTU (raw sends do not fragment)
    errno.ENETUNREACH: LocalResult.UNREACHABLE,
    errno.ENOBUFS: LocalResult.NO_BUFFER,
}
RESULT_NAMES = {r: r.name.lower() for r in LocalResult}  # sent, not_live, refused, ...
MARK_OF = struct.Struct("=I")  # a record's first field
PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr


@dataclass(frozen=True)
class Summary:
    """What the metrics show of the sender (`status` reads the same from the pinned maps)."""

    copies: dict[str, int]  # result name → copies since the maps were made
    queued_bytes: int  # queued, not yet sent
    marks: int  # marks whose copies may go now


class RingReader:
    """A BPF ring buffer map, read in place (mmap), as libbpf's ring_buffer does."""

    def __init__(self, path: Path, size: int = layout.FC_LOCAL_RING_BYTES) -> None:
        self.fd = obj_get(path)
        self.size = size
        self.mask = size - 1
        page = mmap.PAGESIZE
        try:
            self.consumer = mmap.mmap(
                self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            # The data pages are mapped twice in a row, so a record that wraps reads whole.
            self.producer = mmap.mmap(
                self.fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except OSError:
            os.close(self.fd)
            raise
        self.data_offset = page
        self.closed = False

    def pending(self) -> int:
        """Bytes queued and not yet consumed."""
        return int(self._producer_pos() - self._consumer_pos())

    def _consumer_pos(self) -> int:
        return int(struct.unpack_from("=Q", self.consumer, 0)[0])

    def _producer_pos(self) -> int:
        return int(struct.unpack_from("=Q", self.producer, 0)[0])

    def records(self, limit: int = 4096) -> Iterable[bytes]:
        """Committed records in order, each consumed once read (at most `limit`)."""
        cons, prod = self._consumer_pos(), self._producer_pos()
        n = 0
        while cons < prod and n < limit:
            at = self.data_offset + (cons & self.mask)
            header = int(struct.unpack_from("=I", self.producer, at)[0])
            if header & RINGBUF_BUSY:
                break  # reserved, not yet committed
            length = header & ~(RINGBUF_BUSY | RINGBUF_DISCARD)
            if not header & RINGBUF_DISCARD:
                yield self.producer[at + RINGBUF_HEADER : at + RINGBUF_HEADER + length]
            cons += (length + RINGBUF_HEADER + 7) // 8 * 8
            struct.pack_into("=Q", self.consumer, 0, cons)
            n += 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.consumer.close()
        self.producer.close()
        os.close(self.fd)


class LocalOutSender:
    """Drains the ring and sends each copy; `allow`/`retain` say which marks may be sent."""

    def __init__(self, maps_dir: Path, wan_ifindex: int) -> None:
        # First: without CAP_NET_RAW this raises PermissionError, before anything is opened.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.ring = RingReader(maps_dir / "local_out")
        # The counts live in a pinned map (`status` reads them; a restart goes on counting).
        self.counts_map = PinnedMap(maps_dir / "local_results")
        self.counts = [0] * layout.FC_LOCAL_RESULTS
        for result in LocalResult:
            value = ctypes.c_uint64()
            if self.counts_map.lookup(result, value):
                self.counts[result] = int(value.value)
        self._written = list(self.counts)
        self.wan_ifindex = wan_ifindex
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        # A copy is for the tunnel only: never looped back to the gateway's own sockets.
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self._live: frozenset[int] = frozenset()
        self._lock = threading.Lock()
        self._mark = -1  # the socket's current SO_MARK
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._warned: set[LocalResult] = set()  # each kind of failure is logged once

    # -- what the control plane says ---------------------------------------------------------
    def allow(self, marks: Iterable[int]) -> None:
        """These marks' guard rules are in place: their copies may go."""
        with self._lock:
            self._live = frozenset(marks)

    def retain(self, marks: Iterable[int]) -> None:
        """Only these may go any more; returns once no send of another mark is under way, so
        the caller may then remove the others' guard rules."""
        keep = frozenset(marks)
        with self._lock:
            self._live &= keep

    @property
    def live(self) -> frozenset[int]:
        return self._live

    @property
    def started(self) -> bool:
        return self._thread is not None

    def summary(self) -> Summary:
        return Summary(
            copies={RESULT_NAMES[r]: self.counts[r] for r in LocalResult},
            queued_bytes=self.ring.pending() if not self.ring.closed else 0,
            marks=len(self._live),
        )

    # -- the sending loop --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fc-local-out", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.ring.fd, select.POLLIN)
        while not self._stop.is_set():
            try:
                self.drain()
            except OSError as exc:  # the socket or ring is gone: stop, say why
                log.error("local-output sender stopped: %s", exc)
                return
            poller.poll(POLL_S * 1000)

    def drain(self) -> int:
        """Send every queued copy; returns how many records were read."""
        n = 0
        while True:
            batch = list(self.ring.records())
            if not batch:
                return n
            n += len(batch)
            # A LAN packet queues one copy per SA, each with its own mark: sent as queued, the
            # socket's mark would change at every copy (one more system call each). Grouped by
            # mark, it changes once per SA and batch; each SA's copies keep their order.
            by_mark: dict[int, list[bytes]] = {}
            for record in batch:
                by_mark.setdefault(MARK_OF.unpack_from(record)[0], []).append(record)
            for mark, records in by_mark.items():
                self._send_group(mark, records)
            self._write_counts()

    def _send_group(self, mark: int, records: list[bytes]) -> None:
        with self._lock:
            if mark not in self._live:
                self.counts[LocalResult.NOT_LIVE] += len(records)
                return
            for record in records:
                self.counts[self._send_record(mark, record)] += 1

    def _write_counts(self) -> None:
        for result in LocalResult:
            if self.counts[result] != self._written[result]:
                self.counts_map.update(result, ctypes.c_uint64(self.counts[result]))
                self._written[result] = self.counts[result]

    def _send_record(self, mark: int, record: bytes) -> LocalResult:
        """One copy of a live mark (the caller holds the lock)."""
        _mark, _slot, length, family = layout.LOCAL_COPY_HEADER.unpack_from(record, 0)
        packet = record[layout.FC_LOCAL_HEADER : layout.FC_LOCAL_HEADER + length]
        if family != layout.Family.IPV4 or len(packet) < 20:
            return LocalResult.UNSUPPORTED
        try:
            if mark != self._mark:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
                self._mark = mark
            info = PKTINFO.pack(self.wan_ifindex, packet[12:16], b"\0\0\0\0")
            self.sock.sendmsg(
                [packet],
                [(socket.IPPROTO_IP, IP_PKTINFO, info)],
                0,
                (socket.inet_ntoa(packet[16:20]), 0),
            )
            return LocalResult.SENT
        except OSError as exc:
            result = ERRORS.get(exc.errno or 0, LocalResult.OTHER)
            if result not in self._warned:
                self._warned.add(result)
                log.warning("local-output copy for mark %#x not sent: %s", mark, exc)
            return result

    def stop(self) -> None:
        """Stop sending (what is still queued stays in the ring), close socket and ring."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            self.sock.close()
            self.ring.close()
            self.counts_map.close()
