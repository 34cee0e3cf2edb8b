"""Where the lab runs: on this kernel when it has ESP and XFRM interfaces, else in the lab VM.

The VM runs the very same `forecast-bpf lab … --here` command inside, so both paths share all the
code below the decision.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from forecast_lab import capability, netns
from forecast_lab import demo as demo_script
from forecast_lab.bench_report import FORWARDERS
from forecast_lab.conns import GatewayMode
from forecast_lab.lab import Lab, LabOptions
from forecast_lab.topology import Topology
from forecast_lab.vm import LabVM, LabVMError

# Not /run/forecast-bpf: that is the service's runtime directory, which systemd removes at stop.
STATE_DIR = Path("/run/forecast-lab")
# Ends the guest's console shell session (guest/stage2.sh starts a new one at once).
RESPAWN_CONSOLE_SHELL = (
    "import os, signal; os.killpg(int(open('/run/forecast-lab-console.pid').read()), signal.SIGHUP)"
)


@dataclass(frozen=True)
class Placement:
    where: str  # "here" or "vm"
    reason: str


def place(*, here: bool, libipsec: bool) -> Placement:
    if here or libipsec:
        return Placement("here", "asked to run on this kernel")
    cap = capability.probe()
    if cap.can_run_lab:
        return Placement("here", f"{cap.describe()}: running directly")
    return Placement("vm", f"{cap.describe()}: booting the lab kernel under qemu")


def guest_command(sub: str, opts: LabOptions, extra: list[str]) -> list[str]:
    """The same lab command, to run inside the VM on its own (capable) kernel."""
    argv = [
        sys.executable,
        "-m",
        "forecast",
        "lab",
        sub,
        "--here",
        "--clients",
        str(opts.clients),
        "--identities",
        str(opts.identities),
        "--gateway-mode",
        opts.mode.value,
        "--if-id",
        str(opts.if_id),
        *(a for name in sorted(opts.no_broadcast) for a in ("--no-broadcast", name)),
        *(a for name in sorted(opts.nat) for a in ("--nat", name)),
        *([] if opts.set_mark_in else ["--no-set-mark-in"]),
        *(["--ipv6"] if opts.ipv6 else []),
    ]
    return argv + extra


def run_script(
    opts: LabOptions,
    script: str,
    args: list[str],
    *,
    kernel: str,
    here: bool,
    log: IO[str] = sys.stderr,
) -> int:
    placement = place(here=here, libipsec=opts.libipsec)
    print(f"lab: {placement.reason}", file=log, flush=True)
    if placement.where == "here":
        with Lab(opts, log=log) as lab:
            return lab.run_script(script, args)
    with LabVM(kernel, log=log) as vm:
        if not Path(script).exists():
            raise FileNotFoundError(f"lab script {script} does not exist")
        argv = guest_command("run", opts, [str(vm.guest_path(Path(script))), *args])
        return vm.run(argv, stream=sys.stdout).rc


def demo(opts: LabOptions, *, kernel: str, here: bool, out: IO[str] = sys.stdout) -> int:
    """Bring the lab up, run the demo on its gateway (forecast_lab.demo), report."""
    placement = place(here=here, libipsec=opts.libipsec)
    print(f"lab: {placement.reason}", file=out, flush=True)
    if placement.where == "vm":
        with LabVM(kernel, log=out) as vm:
            return vm.run(guest_command("demo", opts, []), stream=out).rc
    with Lab(opts, log=out) as lab:
        return lab.run_script(demo_script.__file__)


# -- lab up / exec / shell / down: a lab that stays up --------------------------------------
# The host keeps one state file per lab in STATE_DIR. A lab in the VM has a "vm" entry (the
# detached qemu); inside the guest the same commands run with --here against the guest's own
# state file.
def state_path(prefix: str) -> Path:
    return STATE_DIR / f"lab-{prefix}.json"


def running_labs() -> list[Path]:
    return sorted(STATE_DIR.glob("lab-*.json"))


def _load_state(prefix: str | None) -> tuple[Path, dict[str, Any]]:
    if prefix:
        path = state_path(prefix)
        if not path.exists():
            raise FileNotFoundError(f"no lab {prefix} is up (no {path})")
    else:
        paths = running_labs()
        if not paths:
            raise FileNotFoundError("no lab is up: start one with `forecast-bpf lab up`")
        if len(paths) > 1:
            names = ", ".join(p.stem.removeprefix("lab-") for p in paths)
            raise ValueError(f"several labs are up ({names}): name one")
        path = paths[0]
    state: dict[str, Any] = json.loads(path.read_text())
    return path, state


def _here_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "forecast", "lab", *args]


def up(opts: LabOptions, *, kernel: str, here: bool, log: IO[str] = sys.stderr) -> str:
    """Bring a lab up and leave it running; returns its prefix."""
    placement = place(here=here, libipsec=opts.libipsec)
    print(f"lab: {placement.reason}", file=log, flush=True)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    if placement.where == "here":
        lab = Lab(opts, log=log)
        try:
            lab.up()
        except BaseException:
            lab.down()
            raise
        state = {"topology": json.loads(lab.topology.to_json()), "workdir": str(lab.workdir)}
        state_path(lab.topology.prefix).write_text(json.dumps(state, indent=2))
        return lab.topology.prefix
    vm = LabVM(kernel, log=log)
    vm.start()
    try:
        job = vm.run(guest_command("up", opts, []))
        found = re.search(r"^lab (\S+) is up", job.output, re.M)
        # The guest's progress, less its own "is up" line (the caller prints the host's).
        log.write(job.output[: found.start()] if found else job.output)
        if job.rc != 0 or not found:
            raise RuntimeError(f"lab up inside the VM failed (exit {job.rc})")
    except BaseException:
        vm.stop()
        raise
    prefix = found.group(1)
    state_path(prefix).write_text(json.dumps({"prefix": prefix, "vm": vm.detach()}, indent=2))
    return prefix


def down(prefix: str | None, log: IO[str] = sys.stderr) -> list[str]:
    """Tear down the named lab (or every lab that is up); returns their prefixes."""
    paths = [state_path(prefix)] if prefix else running_labs()
    done = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no lab {prefix} is up (no {path})")
        state = json.loads(path.read_text())
        if "vm" in state:
            name = state["prefix"]
            try:
                vm = LabVM.attach(state["vm"], log=log)
            except LabVMError as exc:
                print(f"lab: {exc}; removing its state", file=log)
            else:
                # The VM goes away as a whole; tearing the lab down first proves it can.
                job = vm.run(_here_command("down", name))
                vm.stop()
                if job.rc != 0:
                    raise RuntimeError(
                        f"lab {name} did not come down cleanly in the VM:\n" + job.output
                    )
        else:
            topo = Topology.from_json(json.dumps(state["topology"]))
            name = topo.prefix
            topo.destroy()  # ends the charons too: they live in the namespaces
            shutil.rmtree(state["workdir"], ignore_errors=True)
            left = netns.list_with_prefix(name)
            if left:
                raise RuntimeError(f"lab {name} left namespaces behind: {left}")
        path.unlink()
        done.append(name)
    return done


def _gateway_env(state: dict[str, Any]) -> tuple[Topology, dict[str, str]]:
    topo = Topology.from_json(json.dumps(state["topology"]))
    json_path = Path(state["workdir"]) / "topology.json"
    return topo, {**os.environ, **topo.environment(json_path)}


def execute(prefix: str | None, argv: list[str], log: IO[str] = sys.stdout) -> int:
    """Run a command in the gateway's namespace of a running lab; returns its exit code."""
    if not argv:
        raise ValueError("lab exec needs a command to run")
    _path, state = _load_state(prefix)
    if "vm" in state:
        vm = LabVM.attach(state["vm"], log=log)
        job = vm.run(_here_command("exec", "--lab", state["prefix"], *argv), stream=log)
        return job.rc
    topo, env = _gateway_env(state)
    return subprocess.call(["ip", "netns", "exec", topo.gateway.netns, *argv], env=env)


def shell(prefix: str | None) -> int:
    """An interactive shell on the gateway, the topology in its environment."""
    _path, state = _load_state(prefix)
    if "vm" in state:
        vm = LabVM.attach(state["vm"])
        # A fresh console shell, so it starts inside the lab (its session ends with it).
        respawn = vm.run([sys.executable, "-c", RESPAWN_CONSOLE_SHELL], timeout=30)
        if respawn.rc != 0:
            raise RuntimeError(f"could not start a console shell in the VM: {respawn.output}")
        print(
            "lab: console of the lab VM, a shell on the gateway (press Enter for a prompt; "
            "Ctrl-] leaves it)",
            file=sys.stderr,
            flush=True,
        )
        local = "-,raw,echo=0,escape=0x1d" if sys.stdin.isatty() else "-"
        return subprocess.call(["socat", local, f"UNIX-CONNECT:{vm.console_socket}"])
    topo, env = _gateway_env(state)
    env["PS1"] = f"[lab {topo.prefix} gw] \\w# "
    return subprocess.call(
        ["ip", "netns", "exec", topo.gateway.netns, os.environ.get("SHELL", "/bin/bash")], env=env
    )


# -- lab bench: every forwarder, one VM boot ---------------------------------------------------
# The gateway configuration each forwarder is measured in: the plugin with its own, forecast-bpf
# with if_id (the XFRM-interface path), and forecast-bpf with the seed's mark-only configuration
# (the local output path).
BENCH_LABS = {
    "plugin": GatewayMode.REFERENCE_PLUGIN,
    "forecast-bpf": GatewayMode.FORECAST_BPF,
    "forecast-bpf-local-out": GatewayMode.SEED,
}


@dataclass(frozen=True)
class BenchPlan:
    clients: tuple[int, ...] = (2, 8, 32)
    payloads: tuple[int, ...] = (64, 1000)
    rates: tuple[int, ...] = ()  # fixed LAN packets/s steps; () = the stepped ladder
    connects: int = 30
    step_seconds: float = 2.0
    refine: int = 2
    forwarders: tuple[str, ...] = FORWARDERS

    def script_args(self, forwarder: str) -> list[str]:
        args = [
            "--forwarder",
            forwarder,
            "--clients",
            ",".join(map(str, self.clients)),
            "--payloads",
            ",".join(map(str, self.payloads)),
            "--connects",
            str(self.connects),
            "--step-seconds",
            str(self.step_seconds),
            "--refine",
            str(self.refine),
        ]
        return args + (["--rates", ",".join(map(str, self.rates))] if self.rates else [])

    def cli_args(self) -> list[str]:
        # the same plan for `lab bench --here` (the forwarder comes per lab)
        args = self.script_args("-")[2:]
        return [*args, "--forwarders", ",".join(self.forwarders)]


# The lab tier's run: enough to prove every figure of every forwarder is produced, in about
# four minutes.
QUICK_BENCH = BenchPlan(
    clients=(2,), payloads=(64,), rates=(250, 500, 1000), connects=5, step_seconds=2.0, refine=0
)


def bench_here(plan: BenchPlan, log: IO[str] = sys.stderr) -> int:
    """One lab per forwarder on this kernel, one after the other; BENCH lines on stdout."""
    from forecast_lab import bench as bench_script

    rc = 0
    for forwarder in plan.forwarders:
        opts = LabOptions(clients=max(plan.clients), mode=BENCH_LABS[forwarder], connect=False)
        with Lab(opts, log=log) as lab:
            rc |= lab.run_script(bench_script.__file__, plan.script_args(forwarder))
    return rc


class _WithoutRecords:
    """Passes a job's output through, minus the BENCH records (they go to the report)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.partial = ""

    def write(self, text: str) -> int:
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if not line.startswith("BENCH "):
                self.out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def bench(plan: BenchPlan, *, kernel: str, out_dir: Path, log: IO[str] = sys.stderr) -> int:
    """Run the benchmark where the lab runs (one VM boot for every forwarder) and write the
    report into out_dir."""
    from forecast_lab import bench_report

    placement = place(here=False, libipsec=False)
    print(f"lab: {placement.reason}", file=log, flush=True)
    argv = [sys.executable, "-m", "forecast", "lab", "bench", "--here", *plan.cli_args()]
    if placement.where == "vm":
        with LabVM(kernel, log=log) as vm:
            job = vm.run(argv, timeout=3600, stream=_WithoutRecords(log))  # type: ignore[arg-type]
            rc, output = job.rc, job.output
    else:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
        rc, output = proc.returncode, proc.stdout
    records = bench_report.parse(output)
    if not records:
        print("lab bench: the run produced no figures", file=log)
        return rc or 1
    report = bench_report.write(records, out_dir)
    print(report.read_text())
    print(f"lab bench: report in {report}", file=log)
    return rc
