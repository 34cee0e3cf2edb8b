"""The target lists the walkers follow (bpf/forecast.h): who gets a copy, as dense arrays.

Each list exists in two generations. Packets read `gen` once and walk that generation only;
the daemon rewrites the other one, flips `gen`, then waits for an RCU grace period so that no
packet still walks the generation it will rewrite next time (left-right). A packet therefore
sees a list before or after an update, never half of one, and a change costs writes for the
entries that moved, not the whole list: a removal moves the last entry into the gap.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence

from forecast import layout
from forecast.pinned import PinnedMap, RcuBarrier

LISTS = (layout.FC_LIST_LAN, layout.FC_LIST_REINJECT)


def arrange(current: Sequence[int], wanted: Iterable[int]) -> list[int]:
    """`wanted` in an order that keeps what stays where it was: a slot that goes is replaced
    by the last entry, new slots are appended (lowest first)."""
    want = set(wanted)
    out = list(current)
    pos = {slot: i for i, slot in enumerate(out)}
    for slot in [s for s in out if s not in want]:
        i = pos.pop(slot)
        last = out.pop()
        if last != slot:
            out[i] = last
            pos[last] = i
    out += sorted(want - set(out))
    return out


class TargetLists:
    """Both generations of every list, as the kernel holds them."""

    def __init__(self, targets: PinnedMap, lengths: PinnedMap, gen: PinnedMap) -> None:
        self.targets, self.lengths, self.gen = targets, lengths, gen
        self.barrier: RcuBarrier | None = None
        self.active = 0
        self.content: list[dict[int, list[int]]] = [{lst: [] for lst in LISTS} for _ in range(2)]
        self.flips = 0

    def _barrier(self) -> RcuBarrier:
        if self.barrier is None:
            self.barrier = RcuBarrier()
        return self.barrier

    def read(self) -> None:
        """Load both generations from the kernel (at start, at every resync), then wait out
        any packet of a previous daemon still walking the spare one."""
        value = ctypes.c_uint32()
        self.active = int(value.value) & 1 if self.gen.lookup(0, value) else 0
        lengths = self.lengths.dump(layout.FC_GENS * layout.FC_LISTS, ctypes.c_uint32)
        per_gen = layout.FC_LISTS * layout.FC_MAX_SAS
        entries = self.targets.dump(layout.FC_GENS * per_gen, ctypes.c_uint32)
        for g in range(layout.FC_GENS):
            for lst in LISTS:
                n = min(int(lengths[layout.list_key(g, lst)]), layout.FC_MAX_SAS)
                base = layout.target_key(g, lst, 0)
                self.content[g][lst] = [int(v) for v in entries[base : base + n]]
        self._barrier().wait()

    def current(self, lst: int) -> list[int]:
        return list(self.content[self.active][lst])

    def publish(self, wanted: dict[int, Iterable[int]]) -> bool:
        """Make the lists hold `wanted` (list → slots); False when they already did."""
        new = {lst: arrange(self.content[self.active][lst], wanted.get(lst, ())) for lst in LISTS}
        if all(new[lst] == self.content[self.active][lst] for lst in LISTS):
            return False
        self.publish_ordered(new)
        return True

    def publish_ordered(self, new: dict[int, list[int]]) -> None:
        """Make the lists exactly `new`, in that order (publish() chooses an order that
        moves little; tests use this to move every entry at once)."""
        new = {lst: list(new.get(lst, ())) for lst in LISTS}
        for lst, slots in new.items():
            if len(slots) > layout.FC_MAX_SAS:
                raise ValueError(f"list {lst}: {len(slots)} targets, at most {layout.FC_MAX_SAS}")
        spare = 1 - self.active
        writes: dict[int, int] = {}
        for lst, slots in new.items():
            old = self.content[spare][lst]
            for i, slot in enumerate(slots):
                if i >= len(old) or old[i] != slot:
                    writes[layout.target_key(spare, lst, i)] = slot
        self.targets.update_many(writes)
        self.lengths.update_many(
            {layout.list_key(spare, lst): len(slots) for lst, slots in new.items()}
        )
        self.gen.update(0, ctypes.c_uint32(spare))  # the flip: new packets walk `spare`
        self.content[spare] = new
        self.active = spare
        self.flips += 1
        self._barrier().wait()  # ... and none walks the other generation any more

    def close(self) -> None:
        if self.barrier is not None:
            self.barrier.close()
            self.barrier = None
