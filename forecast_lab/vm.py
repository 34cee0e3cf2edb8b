"""The lab VM: a stock Debian kernel under qemu that runs on this machine's own root file system.

The host's `/` is shared read-only over 9p; the guest writes only to tmpfs and overlays. A second
9p share carries jobs to the guest's agent (`forecast_lab.agent`) and their results back, so one
boot serves many scenarios.
"""

from __future__ import annotations

import glob
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

GUEST_DIR = Path(__file__).with_name("guest")
# Where the packages the guest runs live: the checkout, or site-packages when the lab is
# installed. The guest sees it through the host's root, or a share of its own (below).
CODE_DIR = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("FORECAST_LAB_CACHE", "/var/cache/forecast-bpf/lab"))

# Enough to reach the host's root over 9p; everything else loads from the host's /lib/modules.
INITRAMFS_MODULES = ("virtio_pci", "virtio_rng", "9pnet_virtio", "9p", "overlay")
# Loaded in stage 2 so a missing one is reported once, by name, instead of failing later.
GUEST_MODULES = (
    "virtio_console esp4 xfrm_user xfrm_interface veth bridge tun sch_ingress cls_bpf "
    "iptable_mangle xt_mark xt_esp xt_policy xt_tcpudp nf_tables"
)
BOOT_TIMEOUT_S = 120.0
GUEST_SHARE = Path("/run/forecast-lab-share")  # where guest/init mounts the share
GUEST_PRIVATE_DIRS = tuple(Path(d) for d in ("/tmp", "/run", "/root", "/dev"))
BOOT_ATTEMPTS = 3
INITS = ("busybox", "systemd")


class LabVMError(RuntimeError):
    """The VM could not be built, booted or driven; the message says which step and why."""


@dataclass(frozen=True)
class GuestKernel:
    version: str  # e.g. 6.1.0-57-amd64
    image: Path
    modules: Path

    @staticmethod
    def resolve(line: str) -> GuestKernel:
        """Map a kernel line ("6.1", "6.12") to the newest installed generic amd64 kernel of it."""
        if not re.fullmatch(r"\d+\.\d+", line):
            raise LabVMError(f"kernel must look like 6.1 or 6.12, got {line!r}")
        found: list[GuestKernel] = []
        for image in glob.glob(f"/boot/vmlinuz-{line}.*-amd64") + glob.glob(
            f"/boot/vmlinuz-{line}-*-amd64"
        ):
            version = image.removeprefix("/boot/vmlinuz-")
            if version.endswith(("-cloud-amd64", "-rt-amd64")):
                continue
            modules = Path("/lib/modules") / version
            if modules.is_dir():
                found.append(GuestKernel(version, Path(image), modules))
        if not found:
            raise LabVMError(
                f"no Debian {line} kernel with modules in /boot and /lib/modules: run `make setup`"
            )
        return max(found, key=lambda k: [int(x) for x in re.findall(r"\d+", k.version)])


def _module_index(modules_dir: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Module name → relative path, and relative path → its dependencies, from modules.dep."""
    paths: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
        name = re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", os.path.basename(target)).replace("-", "_")
        paths[name] = target
    return paths, deps


def _load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[str]:
    paths, deps = _module_index(modules_dir)
    builtin = (modules_dir / "modules.builtin").read_text()
    order: list[str] = []

    def visit(rel: str) -> None:
        if rel in order:
            return
        for dep in reversed(deps.get(rel, [])):
            visit(dep)
        order.append(rel)

    for name in wanted:
        if name in paths:
            visit(paths[name])
        elif not re.search(rf"/{re.escape(name).replace('_', '[-_]')}\.ko$", builtin, re.M):
            raise LabVMError(f"kernel module {name} is neither in modules.dep nor built in")
    return order


def _read_module(path: Path) -> bytes:
    # busybox insmod takes plain ELF only; Debian compresses modules from 6.12 on.
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def build_initramfs(kernel: GuestKernel) -> Path:
    """Build (or reuse) the ~1.5 MB initramfs for this kernel; cached by content."""
    order = _load_order(kernel.modules, INITRAMFS_MODULES)
    init = (GUEST_DIR / "init").read_bytes()
    key = hashlib.sha256(init + kernel.version.encode() + "\n".join(order).encode()).hexdigest()
    out = CACHE_DIR / f"initramfs-{kernel.version}-{key[:12]}.cpio"
    if out.exists():
        return out
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="forecast-initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "newroot", "ovl", "modules"):
            (root / d).mkdir()
        shutil.copy2("/bin/busybox", root / "bin/busybox")
        (root / "init").write_bytes(init)
        (root / "init").chmod(0o755)
        names = []
        for rel in order:
            name = re.sub(r"\.(xz|zst|gz)$", "", os.path.basename(rel))
            (root / "modules" / name).write_bytes(_read_module(kernel.modules / rel))
            names.append(name)
        (root / "modules.order").write_text("\n".join(names) + "\n")
        os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True)
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--owner=0:0", "--quiet"],
            cwd=root,
            input=files.stdout.encode(),
            capture_output=True,
            check=True,
        )
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(cpio.stdout)
        os.replace(tmp_out, out)
    return out


def _guest_private(path: Path) -> bool:
    return any(path.resolve().is_relative_to(d) for d in GUEST_PRIVATE_DIRS)


@dataclass
class JobResult:
    rc: int
    output: str


def _kvm_usable() -> bool:
    """KVM only where it is known to run a stock kernel: the paravirtual /dev/kvm of some hosts
    opens fine but cannot, so a failed KVM boot is remembered and TCG used from then on."""
    if os.environ.get("FORECAST_LAB_ACCEL") in ("tcg", "kvm"):
        return os.environ["FORECAST_LAB_ACCEL"] == "kvm"
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and not (CACHE_DIR / "kvm-broken").exists()


class LabVM:
    """One booted guest. Use as a context manager; `run()` executes a command inside.

    `detach()` leaves it running for later commands (`lab up`), which `attach()` to it by the
    state `detach()` returned."""

    def __init__(
        self,
        kernel_line: str = "6.1",
        *,
        memory_mb: int = 3072,
        cpus: int = 2,
        log: IO[str] | None = None,
        base: Path | None = None,
        pid: int | None = None,
        init: str = "busybox",
    ) -> None:
        """init: "busybox" (stage 2 is PID 1, the root read-only but /etc, /var) or "systemd"
        (systemd is PID 1 on an all-writable overlay root: packages install, units run)."""
        if init not in INITS:
            raise LabVMError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.init = init
        self.kernel_line = kernel_line
        self.kernel = GuestKernel.resolve(kernel_line)
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.log = log or sys.stderr
        # base/share is the 9p share; the console socket sits beside it (qemu's 9p must never
        # see a socket file).
        self.base = base or Path(tempfile.mkdtemp(prefix="forecast-lab-vm-"))
        self.share = self.base / "share"
        self.share.mkdir(exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = pid
        self.accel = "tcg"
        self.boot_seconds = 0.0

    @property
    def console_socket(self) -> Path:
        return self.base / "console.sock"

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> LabVM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _say(self, msg: str) -> None:
        print(f"lab: {msg}", file=self.log, flush=True)

    def _qemu_argv(self, initramfs: Path, accel: str) -> list[str]:
        stage2 = GUEST_DIR / "stage2.sh"
        append = f"console=ttyS0 panic=-1 quiet forecast.stage2={stage2}"
        if self.init == "systemd":
            append += (
                " forecast.init=systemd systemd.unit=forecast-lab.target systemd.show_status=false"
            )
        repo_share: list[str] = []
        if _guest_private(CODE_DIR):
            # Code under /tmp or /root (a checkout there) is hidden by the guest's own tmpfs:
            # share it at the same path, so the venv's absolute paths hold inside too.
            append += f" forecast.repo={CODE_DIR}"
            repo_share = [
                "-fsdev",
                f"local,id=repo,path={CODE_DIR},security_model=none,readonly=on,multidevs=remap",
                "-device",
                "virtio-9p-pci,fsdev=repo,mount_tag=repo",
            ]
        return [
            "qemu-system-x86_64",
            "-machine",
            f"q35,accel={accel}",
            "-cpu",
            "host" if accel == "kvm" else "max",
            "-smp",
            str(self.cpus),
            "-m",
            str(self.memory_mb),
            "-kernel",
            str(self.kernel.image),
            "-initrd",
            str(initramfs),
            "-append",
            append,
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nic",
            "none",
            "-serial",
            f"file:{self.share / 'console.log'}",
            "-device",
            "virtio-rng-pci",
            # An interactive shell for `lab shell` (the guest runs one on /dev/hvc0).
            "-chardev",
            f"socket,id=shell,path={self.console_socket},server=on,wait=off",
            "-device",
            "virtio-serial-pci",
            "-device",
            "virtconsole,chardev=shell",
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev",
            f"local,id=share,path={self.share},security_model=none,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=share,mount_tag=share",
            *repo_share,
        ]

    def _write_guest_env(self) -> None:
        env = {
            "FORECAST_REPO": str(CODE_DIR),
            # The interpreter running this (a checkout's venv or the system's): its absolute
            # path holds in the guest, which sees the host's root.
            "FORECAST_PYTHON": sys.executable,
            "FORECAST_GUEST_MODULES": GUEST_MODULES,
        }
        (self.share / "guest.env").write_text(
            "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        )

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        if self.pid is None:
            return False
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return False
        # Guard against pid reuse: it must be our qemu, with our share.
        return str(self.share).encode() in cmdline

    def _boot_once(self, initramfs: Path, accel: str, timeout: float) -> bool:
        for name in ("booted", "agent.ready", "agent.rc", "console.log"):
            (self.share / name).unlink(missing_ok=True)
        started = time.monotonic()
        with (self.base / "qemu.log").open("ab") as qemu_log:
            # Own session: a detached lab VM must survive the command that booted it.
            self.proc = subprocess.Popen(
                self._qemu_argv(initramfs, accel),
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        while time.monotonic() - started < timeout:
            if (self.share / "agent.ready").exists():
                self.boot_seconds = time.monotonic() - started
                self.accel = accel
                return True
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self._kill()
        return False

    def start(self) -> None:
        if not shutil.which("qemu-system-x86_64"):
            raise LabVMError("qemu-system-x86_64 not found: run `make setup` (as root)")
        if os.geteuid() != 0:
            raise LabVMError("the lab VM needs root (it reads /boot and shares / over 9p)")
        initramfs = build_initramfs(self.kernel)
        self._write_guest_env()
        (self.share / "jobs").mkdir(exist_ok=True)
        if _kvm_usable():
            if self._boot_once(initramfs, "kvm", 30):
                self._say(f"booted {self.kernel.version} with KVM in {self.boot_seconds:.1f} s")
                return
            self._say("KVM could not boot the stock kernel here; using TCG from now on")
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            (CACHE_DIR / "kvm-broken").write_text("a stock kernel did not boot under KVM\n")
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            if self._boot_once(initramfs, "tcg", BOOT_TIMEOUT_S):
                self._say(
                    f"booted {self.kernel.version} ({self.init}) under qemu TCG in "
                    f"{self.boot_seconds:.1f} s (attempt {attempt})"
                )
                return
            # About 1 boot in 40 dies early under TCG (kernel text patching): boot again.
            self._say(
                f"guest did not reach its agent (attempt {attempt}); console tail:\n"
                + self.console_tail()
            )
        self.stop()
        raise LabVMError(f"lab VM failed to boot {BOOT_ATTEMPTS} times; see console above")

    def detach(self) -> dict[str, str]:
        """Leave the VM running; the returned state lets a later command attach() to it."""
        if not self.alive() or self.pid is None:
            raise LabVMError("cannot detach: the lab VM is not running")
        state = {
            "pid": str(self.pid),
            "base": str(self.base),
            "kernel": self.kernel_line,
            "init": self.init,
        }
        self.proc = None  # the pid stays; nothing here waits for it any more
        return state

    @classmethod
    def attach(cls, state: dict[str, str], log: IO[str] | None = None) -> LabVM:
        vm = cls(
            state["kernel"],
            log=log,
            base=Path(state["base"]),
            pid=int(state["pid"]),
            init=state.get("init", "busybox"),
        )
        if not vm.alive():
            raise LabVMError(f"the lab VM (pid {state['pid']}) is no longer running")
        return vm

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = (self.share / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no console output)"
        return "\n".join(text.splitlines()[-lines:])

    def _kill(self) -> None:
        if self.alive() and self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait()
            else:
                _wait_gone(self.pid, 10)

    def stop(self) -> None:
        if self.alive():
            (self.share / "jobs" / "shutdown").write_text("")
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._kill()
            elif self.pid is not None and not _wait_gone(self.pid, 30):
                self._kill()
        self.proc = None
        self.pid = None
        if os.environ.get("FORECAST_LAB_KEEP") != "1":
            shutil.rmtree(self.base, ignore_errors=True)

    # -- jobs -------------------------------------------------------------------------------
    def guest_path(self, host_path: Path) -> Path:
        """A path the guest can read for a host file: the guest has its own /tmp, /run and
        /root (tmpfs), so a file there is copied into the share first."""
        host_path = host_path.resolve()
        if not _guest_private(host_path) or host_path.is_relative_to(CODE_DIR):
            return host_path
        scripts = self.share / "files"
        scripts.mkdir(exist_ok=True)
        copy = scripts / f"{len(list(scripts.iterdir())):03d}-{host_path.name}"
        shutil.copy2(host_path, copy)
        return GUEST_SHARE / copy.relative_to(self.share)

    def run(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        timeout: float = 600,
        stream: IO[str] | None = None,
    ) -> JobResult:
        """Run argv in the guest (root namespace); returns its exit code and combined output."""
        if not self.alive():
            raise LabVMError("the lab VM is not running:\n" + self.console_tail())
        jobs = self.share / "jobs"
        # Unique across every process that drives this VM (lab up, then lab exec, ...).
        job_id = f"{time.time_ns()}-{os.getpid()}"
        spec = {"argv": argv, "env": env or {}, "timeout": timeout, "cwd": str(CODE_DIR)}
        tmp = jobs / f"{job_id}.json.tmp"
        tmp.write_text(json.dumps(spec))
        os.replace(tmp, jobs / f"{job_id}.json")
        out_path, rc_path = jobs / f"{job_id}.out", jobs / f"{job_id}.rc"
        deadline = time.monotonic() + timeout + 30
        shown = 0
        while True:
            done = rc_path.exists()
            if stream is not None and out_path.exists():
                with out_path.open("rb") as f:  # only what is new since the last look
                    f.seek(shown)
                    chunk = f.read()
                shown += len(chunk)
                stream.write(chunk.decode(errors="replace"))
                stream.flush()
            if done:
                break
            if not self.alive():
                raise LabVMError(
                    f"the lab VM stopped during job {argv!r}:\n" + self.console_tail(80)
                )
            if time.monotonic() > deadline:
                raise LabVMError(f"job {argv!r} gave no result within {timeout + 30:.0f} s")
            time.sleep(0.1)
        output = out_path.read_text(errors="replace") if out_path.exists() else ""
        return JobResult(int(rc_path.read_text().strip()), output)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.1)
    return False
