"""Clients that move, in the lab: one behind its own NAT router, real ESP in UDP, the inbound
MARK rules alone marking what clients send (tests/lab/scripts/moves.py). With the iptables back
end: the other lab scenarios run the default (nftables on Debian 12); the kernel tier runs the
same moves against both."""

from __future__ import annotations

from collections.abc import Callable

from tests.lab.conftest import LabRunner

LAB_ARGS = ("--gateway-mode", "forecast-bpf", "--clients", "2", "--nat", "c2", "--no-set-mark-in")


def test_nat_mapping_and_mobike_moves(lab: LabRunner, figures: Callable[[str], None]) -> None:
    backend = "iptables"
    run = lab.script("moves.py", *LAB_ARGS, script_args=(backend,))
    failed = [r for r in run.results if not r["ok"]]
    print(run.output[-6000:])
    assert run.rc == 0 and not failed, run.output
    assert len(run.results) == 11, [r["name"] for r in run.results]
    for what in ("new NAT mapping of c2", "MOBIKE move of c1"):
        detail = run.result(f"{what}: forwarding both ways is back within a second, no duplicate")[
            "detail"
        ]
        flows = {k: v for k, v in detail.items() if " -> " in k}
        assert len(flows) == 4  # lan -> c1, lan -> c2, sender -> lan, sender -> other client
        figures(
            f"{backend}, {what}: "
            + ", ".join(
                f"{k} {v['interruption_ms']} ms ({v['lost']} lost)" for k, v in flows.items()
            )
        )
