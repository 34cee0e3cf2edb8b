"""Lab tier: real kernel ESP. One VM boot per kernel line per test session; each scenario is a
`forecast-bpf lab run --here` job inside it (or runs directly on a capable host kernel).

Cannot run (no root, no qemu, no kernel) → every test errors with the reason, never a skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from forecast_lab import capability
from forecast_lab.vm import LabVM, LabVMError

SCRIPTS = Path(__file__).with_name("scripts")


@dataclass
class ScenarioRun:
    rc: int
    output: str
    seconds: float
    results: list[dict[str, Any]] = field(default_factory=list)

    def result(self, name_part: str) -> dict[str, Any]:
        for r in self.results:
            if name_part in r["name"]:
                return r
        raise AssertionError(f"no result named like {name_part!r} in:\n{self.output}")


class LabRunner:
    """Runs lab commands where the lab lives: inside a booted VM, or here on a capable kernel."""

    def __init__(self, vm: LabVM | None, kernel: str) -> None:
        self.vm = vm
        self.kernel = kernel
        self.timings: list[tuple[str, float]] = []

    def run(
        self, argv: list[str], timeout: float = 300, env: dict[str, str] | None = None
    ) -> tuple[int, str]:
        if self.vm is not None:
            job = self.vm.run(argv, timeout=timeout, env=env)
            return job.rc, job.output
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **(env or {})},
        )
        return proc.returncode, proc.stdout + proc.stderr

    def lab(
        self, sub: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> ScenarioRun:
        argv = [sys.executable, "-m", "forecast", "lab", sub, "--here", *args]
        t0 = time.monotonic()
        rc, out = self.run(argv, timeout, env)
        seconds = time.monotonic() - t0
        self.timings.append((" ".join(args), seconds))
        results = [
            json.loads(line.removeprefix("RESULT "))
            for line in out.splitlines()
            if line.startswith("RESULT ")
        ]
        return ScenarioRun(rc, out, seconds, results)

    def script(
        self,
        name: str,
        *lab_args: str,
        script_args: tuple[str, ...] = (),
        timeout: float = 300,
        env: dict[str, str] | None = None,
    ) -> ScenarioRun:
        return self.lab(
            "run", *lab_args, str(SCRIPTS / name), *script_args, timeout=timeout, env=env
        )

    def guest_path(self, path: Path) -> Path:
        """Where the lab sees a file of this machine."""
        return self.vm.guest_path(path) if self.vm is not None else path


def _runner(kernel: str, init: str = "busybox") -> Iterator[LabRunner]:
    if os.geteuid() != 0:
        pytest.fail("lab tier needs root (qemu, namespaces, charon): run as root", pytrace=False)
    if init == "busybox" and capability.probe().can_run_lab:
        yield LabRunner(None, kernel)
        return
    try:
        vm = LabVM(kernel, init=init)
        vm.start()
    except LabVMError as exc:
        pytest.fail(f"lab tier cannot boot the {kernel} lab VM: {exc}", pytrace=False)
    runner = LabRunner(vm, kernel)
    try:
        yield runner
    finally:
        # Nothing may outlive a scenario inside the guest either.
        rc, left = runner.run(["ip", "netns", "list"])
        vm.stop()
        print(
            f"\nlab {kernel}: boot {vm.boot_seconds:.1f} s; scenarios: "
            + ", ".join(f"{name or 'default'} {s:.1f} s" for name, s in runner.timings)
        )
        assert rc == 0 and not left.strip(), f"namespaces left in the lab guest: {left}"


@pytest.fixture(scope="session")
def lab() -> Iterator[LabRunner]:
    yield from _runner(os.environ.get("FORECAST_LAB_KERNEL", "6.1"))


@pytest.fixture(scope="session")
def lab_612() -> Iterator[LabRunner]:
    yield from _runner("6.12")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The systemd VM's scenario first: its VM is gone before the session's VMs boot (two
    guests under TCG on two cores slow each other down). Then the 1,000-SA scenario, in a fresh
    guest: after other scenarios the same guest took 1.6-2x as long (no process or namespace
    left over; cause not yet found)."""

    def order(item: pytest.Item) -> int:
        if "lab_systemd" in getattr(item, "fixturenames", ()):
            return 0
        return 1 if item.nodeid.startswith("tests/lab/test_lab_scale.py") else 2

    items.sort(key=order)


@pytest.fixture(scope="module")
def lab_systemd() -> Iterator[LabRunner]:
    """A lab VM whose PID 1 is systemd, on an all-writable root: packages install, units run
    (always a VM: a package install must never touch the machine running the tests)."""
    yield from _runner(os.environ.get("FORECAST_LAB_KERNEL", "6.1"), init="systemd")
