"""Where the lab runs: on this kernel when it has ESP and XFRM interfaces, else in the lab VM.

The VM runs the very same `forecast-bpf lab … --here` command inside, so both paths share all the
code below the decision.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from forecast.lab import capability, checks, netns
from forecast.lab.lab import Lab, LabOptions
from forecast.lab.topology import Topology
from forecast.lab.vm import LabVM

STATE_DIR = Path("/run/forecast-bpf")


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
        "--gateway-mode",
        opts.mode.value,
        "--if-id",
        str(opts.if_id),
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
    """Bring the lab up with strongSwan's forecast plugin, run the reference scenario, report."""
    placement = place(here=here, libipsec=opts.libipsec)
    print(f"lab: {placement.reason}", file=out, flush=True)
    if placement.where == "vm":
        with LabVM(kernel, log=out) as vm:
            return vm.run(guest_command("demo", opts, []), stream=out).rc
    with Lab(opts, log=out) as lab:
        print("\nCHILD_SAs on the gateway:", file=out)
        for c in lab.child_sas("gw"):
            print(
                f"  {c['ike']}/{c['name']} #{c['uniqueid']}  {c['remote-id']}  vip "
                f"{c['remote-vips']}  mark {c.get('mark-in', '-')}  spi-in {c['spi-in']}  "
                f"ts {c['remote-ts']}",
                file=out,
            )
        print(f"\nscenario ({opts.mode.value} gateway, kernel {os.uname().release}):", file=out)
        results = checks.reference_scenario(lab.topology)
        for r in results:
            print("  " + r.line(), file=out)
        passed = sum(r.ok for r in results)
        print(f"\n{passed} passed, {len(results) - passed} failed", file=out)
        return 0 if passed == len(results) else 1


# -- lab up / down / shell on this kernel --------------------------------------------------
def state_path(prefix: str) -> Path:
    return STATE_DIR / f"lab-{prefix}.json"


def up_here(opts: LabOptions, log: IO[str] = sys.stderr) -> Topology:
    lab = Lab(opts, log=log)
    try:
        lab.up()
    except BaseException:
        lab.down()
        raise
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = {"topology": json.loads(lab.topology.to_json()), "workdir": str(lab.workdir)}
    state_path(lab.topology.prefix).write_text(json.dumps(state, indent=2))
    return lab.topology


def running_labs() -> list[Path]:
    return sorted(STATE_DIR.glob("lab-*.json"))


def down_here(prefix: str | None) -> list[str]:
    """Tear down the named lab (or every lab this machine has up); returns their prefixes."""
    paths = [state_path(prefix)] if prefix else running_labs()
    done = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no lab {prefix} is up (no {path})")
        state = json.loads(path.read_text())
        topo = Topology.from_json(json.dumps(state["topology"]))
        topo.destroy()  # ends the charons too: they live in the namespaces
        shutil.rmtree(state["workdir"], ignore_errors=True)
        path.unlink()
        left = netns.list_with_prefix(topo.prefix)
        if left:
            raise RuntimeError(f"lab {topo.prefix} left namespaces behind: {left}")
        done.append(topo.prefix)
    return done


def shell_here(prefix: str | None) -> int:
    """An interactive shell in the gateway's namespace with the topology in its environment."""
    paths = [state_path(prefix)] if prefix else running_labs()
    if not paths or not paths[0].exists():
        raise FileNotFoundError("no lab is up: start one with `forecast-bpf lab up`")
    if len(paths) > 1:
        names = ", ".join(p.stem.removeprefix("lab-") for p in paths)
        raise ValueError(f"several labs are up ({names}): name one")
    state = json.loads(paths[0].read_text())
    topo = Topology.from_json(json.dumps(state["topology"]))
    json_path = Path(state["workdir"]) / "topology.json"
    env = {**os.environ, **topo.environment(json_path), "PS1": f"[lab {topo.prefix} gw] \\w# "}
    shell = os.environ.get("SHELL", "/bin/bash")
    return subprocess.call(["ip", "netns", "exec", topo.gateway.netns, shell], env=env)
