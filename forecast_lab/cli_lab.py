"""`forecast-bpf lab …` commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from forecast_lab import capability, runner
from forecast_lab.conns import GatewayMode
from forecast_lab.lab import LabOptions
from forecast_lab.topology import MAX_CLIENTS
from forecast_lab.vm import LabVMError


def _fail(msg: str) -> int:
    print(f"forecast-bpf lab: error: {msg}", file=sys.stderr)
    return 2


def lab_options(args: argparse.Namespace) -> LabOptions:
    mode = GatewayMode.REFERENCE_PLUGIN if args.reference_plugin else GatewayMode(args.gateway_mode)
    return LabOptions(
        clients=args.clients,
        identities=args.identities,
        mode=mode,
        if_id=args.if_id,
        libipsec=args.libipsec,
        no_broadcast=frozenset(args.no_broadcast or []),
        nat=frozenset(args.nat or []),
        set_mark_in=not args.no_set_mark_in,
        ipv6=args.ipv6,
    )


def _bench(args: argparse.Namespace) -> int:
    if args.quick:
        plan = runner.QUICK_BENCH
    else:
        plan = runner.BenchPlan(
            clients=tuple(sorted(args.clients)),
            payloads=args.payloads,
            rates=args.rates,
            connects=args.connects,
            step_seconds=args.step_seconds,
            refine=args.refine,
            forwarders=args.forwarders or runner.BenchPlan.forwarders,
        )
    if max(plan.clients) > MAX_CLIENTS:
        return _fail(f"--clients: at most {MAX_CLIENTS}")
    if args.here:
        return runner.bench_here(plan)
    return runner.bench(plan, kernel=args.kernel, out_dir=Path(args.out))


def dispatch(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 and args.lab_command != "probe":
        return _fail("the lab needs root (network namespaces, charon, qemu)")
    try:
        if args.lab_command == "probe":
            cap = capability.probe()
            print(cap.describe())
            where = "directly on this kernel" if cap.can_run_lab else "in the lab VM (qemu)"
            print(f"the lab runs {where}")
            return 0
        if args.lab_command == "down":
            for prefix in runner.down(args.prefix):
                print(f"lab {prefix} is down")
            return 0
        if args.lab_command == "shell":
            return runner.shell(args.prefix)
        if args.lab_command == "exec":
            return runner.execute(args.lab, args.argv)
        if args.lab_command == "bench":
            return _bench(args)
        opts = lab_options(args)
        clients = {f"c{i}" for i in range(1, opts.clients + 1)}
        for flag, named in (("--no-broadcast", opts.no_broadcast), ("--nat", opts.nat)):
            if named - clients:
                return _fail(f"{flag} names no client of this lab: {sorted(named - clients)}")
        if args.lab_command == "run":
            return runner.run_script(
                opts, args.script, args.args, kernel=args.kernel, here=args.here
            )
        if args.lab_command == "demo":
            return runner.demo(opts, kernel=args.kernel, here=args.here)
        if args.lab_command == "up":
            prefix = runner.up(opts, kernel=args.kernel, here=args.here)
            print(
                f"lab {prefix} is up; `forecast-bpf lab shell {prefix}` for a shell on the "
                f"gateway, `forecast-bpf lab exec --lab {prefix} CMD` to run a command there, "
                f"`forecast-bpf lab down {prefix}` to remove it"
            )
            return 0
    except (LabVMError, FileNotFoundError, ValueError, RuntimeError) as exc:
        return _fail(str(exc))
    return _fail(f"unknown lab command {args.lab_command}")
