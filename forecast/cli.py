"""Command line: argument parsing only; each command lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from forecast import __version__
from forecast.status import SORT_KEYS

# The lab (package forecast_lab) ships with the source tree, not with the gateway's package.
LAB_MISSING = (
    "the lab is not installed here (it ships with the source tree, not with the gateway package)"
)


def _positive_clients(text: str) -> int:
    try:
        from forecast_lab.topology import MAX_CLIENTS
    except ImportError:
        raise argparse.ArgumentTypeError(LAB_MISSING) from None

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clients takes a number, got {text!r}") from None
    if not 1 <= value <= MAX_CLIENTS:
        raise argparse.ArgumentTypeError(f"--clients must be 1..{MAX_CLIENTS}, got {value}")
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--interval takes seconds, got {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("--interval must be 0.1..3600 seconds")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _if_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--if-id takes a number, got {text!r}") from None
    if not 1 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError("--if-id must be 1..4294967295 (0 is not an if_id)")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 2,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _forwarders(text: str) -> tuple[str, ...]:
    try:
        from forecast_lab.bench_report import FORWARDERS
    except ImportError:
        raise argparse.ArgumentTypeError(LAB_MISSING) from None

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = set(names) - set(FORWARDERS)
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"forwarders are {', '.join(FORWARDERS)}, got {text!r}")
    return names


def _add_lab_topology_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=_positive_clients, default=2, help="road warriors (2)")
    p.add_argument(
        "--identities",
        type=_positive,
        default=1,
        help="road-warrior identities (IKE_SAs, each with its own virtual IP) per client (1)",
    )
    p.add_argument(
        "--kernel",
        choices=["6.1", "6.12"],
        default=os.environ.get("FORECAST_LAB_KERNEL", "6.1"),
        help="lab VM kernel line (6.1)",
    )
    p.add_argument(
        "--gateway-mode",
        choices=["seed", "forecast-bpf", "reference-plugin"],
        default="seed",
        help="seed config alone; + if_id/set_mark_in for "
        "forecast-bpf; or strongSwan's own forecast plugin",
    )
    p.add_argument(
        "--reference-plugin", action="store_true", help="same as --gateway-mode reference-plugin"
    )
    p.add_argument("--if-id", type=_if_id, default=42, help="XFRM if_id for forecast-bpf mode")
    p.add_argument(
        "--no-broadcast",
        action="append",
        metavar="CLIENT",
        help="this client gets a gateway child without the LAN broadcast TS",
    )
    p.add_argument(
        "--nat",
        action="append",
        metavar="CLIENT",
        help="this client sits behind a NAT router of its own (UDP-encapsulated ESP)",
    )
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="dual stack: an IPv6 LAN, IPv6 virtual IPs and IPv6 multicast selectors too",
    )
    p.add_argument(
        "--no-set-mark-in",
        action="store_true",
        help="gateway children without set_mark_in: only the inbound MARK rules mark",
    )
    p.add_argument(
        "--here",
        action="store_true",
        help="run on this kernel even if it lacks ESP (the VM uses this inside)",
    )
    p.add_argument(
        "--libipsec",
        action="store_true",
        help="user-space ESP (kernel-libipsec) on this kernel; implies --here",
    )


# name, one line for `forecast-bpf --help`, its own --help's description (with exit codes)
COMMANDS = (
    (
        "run",
        "run the daemon in the foreground (systemd: forecast-bpf.service)",
        "Run the daemon in the foreground: XFRM interface, TC programs (adopted from a previous\n"
        "daemon when it left them forwarding), MARK rules and routes kept in step with charon.\n"
        "SIGHUP: reload groups, groups6, client_groups, storm_guard. SIGTERM: stop and remove\n"
        "everything (under systemd, a restart hands over instead). SIGUSR2: exit, leaving the\n"
        "data path forwarding for the next daemon.\n\n"
        "exit codes: 0 stopped, 1 set-up failed, 2 bad configuration, not root, or another\n"
        "daemon runs",
    ),
    (
        "stop",
        "remove a data path that no daemon runs (left by a hand-over or a crash)",
        "Remove what a daemon left forwarding (filters, maps, MARK rules, routes, the XFRM\n"
        "interface) when no daemon will take it over.\n\n"
        "exit codes: 0 removed (or nothing to remove), 2 bad configuration, not root, or a\n"
        "daemon still runs",
    ),
    (
        "check",
        "tell, child by child, what strongSwan's live SAs lack",
        "Read charon's live CHILD_SAs over VICI and say, for each, what forecast-bpf needs and\n"
        "it lacks (mark, if_id, set_mark_in, a multicast or broadcast selector), and which path\n"
        "its copies take: xfrm (if_id set) or local-out (mark only, as the plugin).\n\n"
        "exit codes: 0 every child ready (or none up), 1 some need changes, 2 bad\n"
        "configuration or charon unreachable",
    ),
    (
        "status",
        "per-SA counters of the running daemon",
        "Per-SA counters, live from the pinned BPF maps, the copies by address family, drops\n"
        "and the daemon's state.\n\n"
        "exit codes: 0 a daemon runs, 1 the daemon is down but its data path still forwards,\n"
        "2 bad configuration or arguments, 3 nothing runs (with --json: a document that says\n"
        "why, on stdout)",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forecast-bpf",
        description=("Forward multicast and broadcast across strongSwan IPsec tunnels with eBPF."),
    )
    parser.add_argument("--version", action="version", version=f"forecast-bpf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from forecast.config import DEFAULT_PATH

    for name, help_text, description in COMMANDS:
        p = sub.add_parser(
            name,
            help=help_text,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "-c", "--config", default=str(DEFAULT_PATH), help=f"configuration ({DEFAULT_PATH})"
        )
        if name == "status":
            p.add_argument(
                "-j",
                "--json",
                action="store_true",
                help="machine-readable (schema 1), also when nothing runs",
            )
            p.add_argument(
                "-w",
                "--watch",
                action="store_true",
                help="refresh in place like top, with rates per second",
            )
            p.add_argument(
                "-i",
                "--interval",
                type=_interval,
                default=1.0,
                help="seconds between --watch refreshes (1)",
            )
            p.add_argument(
                "-s",
                "--sort",
                choices=SORT_KEYS,
                default="slot",
                help="row order; counters sort busiest first (by rate under --watch)",
            )
            p.add_argument("-t", "--top", type=_positive, metavar="N", help="only the first N rows")
            p.add_argument(
                "-m",
                "--match",
                metavar="ID|VIP|CONN",
                help="only SAs with this unique id, or whose virtual IP, remote id or "
                "connection/child name contains this text",
            )

    lab = sub.add_parser("lab", help="try it in a lab with real strongSwan and real IPsec")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    run = lab_sub.add_parser("run", help="bring the lab up, run SCRIPT on the gateway, tear down")
    _add_lab_topology_args(run)
    run.add_argument("script")
    run.add_argument("args", nargs=argparse.REMAINDER)
    demo = lab_sub.add_parser(
        "demo", help="tunnels up, forecast-bpf forwarding (or --reference-plugin), results"
    )
    _add_lab_topology_args(demo)
    demo.set_defaults(gateway_mode="forecast-bpf")
    up = lab_sub.add_parser("up", help="bring a lab up and leave it running (in the VM if needed)")
    _add_lab_topology_args(up)
    down = lab_sub.add_parser("down", help="tear down a lab brought up with `lab up`")
    down.add_argument("prefix", nargs="?", help="which lab (default: every lab that is up)")
    shell = lab_sub.add_parser("shell", help="a shell on the gateway of a running lab")
    shell.add_argument("prefix", nargs="?", help="which lab (default: the only one up)")
    run_in = lab_sub.add_parser("exec", help="run a command on the gateway of a running lab")
    run_in.add_argument("--lab", metavar="PREFIX", help="which lab (default: the only one up)")
    run_in.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD")
    lab_sub.add_parser("probe", help="can this kernel run the lab directly?")
    bench = lab_sub.add_parser(
        "bench",
        help="strongSwan's forecast plugin and forecast-bpf under the same load; writes a report",
        description="Boots the lab once and measures each forwarder with the same traffic "
        "(strongSwan's plugin; forecast-bpf with if_id, its XFRM-interface path; forecast-bpf "
        "with the plugin's mark-only configuration, its local output path): "
        "stepped LAN multicast rates per client count and payload, a plain-ESP baseline, "
        "CHILD_SA up to first copy, daemon start. Writes report.md, plots and the raw records "
        "to --out. Exit codes: 0 measured, 1 a run failed, 2 bad arguments.",
    )
    bench.add_argument(
        "--kernel",
        choices=["6.1", "6.12"],
        default=os.environ.get("FORECAST_LAB_KERNEL", "6.1"),
        help="lab VM kernel line (6.1)",
    )
    bench.add_argument("--clients", type=_int_list, default=(2, 8, 32), help="2,8,32")
    bench.add_argument("--payloads", type=_int_list, default=(64, 1000), help="UDP bytes: 64,1000")
    bench.add_argument("--rates", type=_int_list, default=(), help="fixed LAN packets/s steps")
    bench.add_argument("--connects", type=_positive, default=30, help="connects timed (30)")
    bench.add_argument("--step-seconds", type=float, default=2.0, help="seconds per step (2)")
    bench.add_argument("--refine", type=int, default=2, help="bisections at the knee (2)")
    bench.add_argument(
        "--forwarders",
        type=_forwarders,
        default=None,
        help="plugin,forecast-bpf,forecast-bpf-local-out (default: all three)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="2 clients, 64 B, three rates (the lab tier's run)"
    )
    bench.add_argument("--out", default="build/bench", help="report directory (build/bench)")
    bench.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "stop", "check", "status"):
        from forecast import cli_daemon

        return {
            "run": cli_daemon.run,
            "stop": cli_daemon.run_stop,
            "check": cli_daemon.run_check,
            "status": cli_daemon.run_status,
        }[args.command](args)
    if args.command == "lab":
        try:
            from forecast_lab import cli_lab
        except ImportError:
            print(f"forecast-bpf: error: {LAB_MISSING}", file=sys.stderr)
            return 2

        return cli_lab.dispatch(args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
