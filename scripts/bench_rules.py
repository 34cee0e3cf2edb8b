"""MARK rules at scale, both netfilter back ends, in a scratch network namespace (root).

For N SAs (3 rules each: the inbound ESP flow, the virtual IP in PREROUTING and OUTPUT): a whole
write, a rekey (one rule added and one removed, by difference), a connect (three added), the
listing the daemon compares at every resync, and the removal. Prints milliseconds, the median
of --repeat runs.

    sudo .venv/bin/python scripts/bench_rules.py --sas 1000 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forecast import netfilter
from forecast.desired import MarkRule, RuleMatch
from forecast_lab import netns

GW = IPv4Network("192.168.0.1/32")


def sa_rules(i: int, spi: int) -> list[MarkRule]:
    peer = IPv4Network(f"192.168.{64 + i // 250}.{1 + i % 250}/32")
    vip = IPv4Network(f"10.{16 + i // 250}.{i % 250}.1/32")
    comment = f"forecast-bpf rw/rw #{i} c{i}@forecast.lab"
    return [
        MarkRule("PREROUTING", RuleMatch(peer, GW, "esp", spi=spi), i + 1, comment),
        MarkRule("PREROUTING", RuleMatch(dst=vip), i + 1, comment),
        MarkRule("OUTPUT", RuleMatch(dst=vip), i + 1, comment),
    ]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def measure(backend: str, n: int, repeat: int, ns: str) -> dict[str, float]:
    rules = netfilter.choose(backend, ns)
    base = [r for i in range(n) for r in sa_rules(i, 0x10000 + i)]
    out: dict[str, list[float]] = {k: [] for k in ("write", "rekey", "connect", "list", "remove")}
    rekeyed = [*base[1:], sa_rules(0, 0x20000)[0]]
    grown = [*rekeyed, *sa_rules(n, 0x30000)]
    for _ in range(repeat):
        out["write"].append(timed(lambda: rules.apply(base)))
        out["rekey"].append(timed(lambda: rules.apply(rekeyed, known=base)))
        out["connect"].append(timed(lambda: rules.apply(grown, known=rekeyed)))
        out["list"].append(timed(rules.signatures))
        out["remove"].append(timed(rules.remove))
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--sas", type=int, nargs="+", default=[1000])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    ns = f"{netns.unique_prefix('fcbr')}-rules"
    netns.create(ns)
    try:
        print(f"{'back end':<10} {'SAs':>6} {'rules':>6}  ms: write  rekey connect   list remove")
        for n in args.sas:
            for backend in ("nftables", "iptables"):
                m = measure(backend, n, args.repeat, ns)
                print(
                    f"{backend:<10} {n:>6} {3 * n:>6}  {m['write']:>9.1f} {m['rekey']:>6.1f} "
                    f"{m['connect']:>7.1f} {m['list']:>6.1f} {m['remove']:>6.1f}"
                )
    finally:
        netns.delete(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
