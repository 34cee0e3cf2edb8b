"""Compile the TC programs with bcc: kernel headers, bpffs for the pinned maps, cflags.

bcc needs a kernel header tree. A matching /lib/modules/$(uname -r)/build just works; where none
exists (kernels Debian does not ship headers for) a tree merged from the newest installed
Debian `linux-headers-*-common` and `-amd64` packages serves TC programs, which only use uapi
types (docs/design.md).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

HEADER_CACHE = Path(os.environ.get("FORECAST_HEADER_CACHE", "/var/cache/forecast-bpf/headers"))


STANDARD_BPFFS = Path("/sys/fs/bpf")


class BuildError(RuntimeError):
    """The programs could not be compiled or loaded; the message says why."""


def bpf_dir() -> Path:
    """The BPF sources: package data in an install, bpf/ in a checkout (an editable install)."""
    if "FORECAST_BPF_DIR" in os.environ:
        return Path(os.environ["FORECAST_BPF_DIR"])
    here = Path(__file__).resolve().parent
    for candidate in (here / "bpf", here.parent / "bpf"):
        if (candidate / "forecast.h").exists():
            return candidate
    raise BuildError(f"the BPF sources are missing (looked in {here / 'bpf'})")


def bcc_version() -> str:
    """Read from bcc's version.py, not by importing bcc: that loads libbcc and LLVM (about
    60 MB) into a process that only wants to know which build it runs."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.submodule_search_locations:
        return "no-bcc"
    for location in spec.submodule_search_locations:
        version = Path(location) / "version.py"
        if version.exists():
            m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", version.read_text())
            if m:
                return m.group(1)
    return "unknown"


def _version_key(path: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", path)]


def kernel_source() -> Path | None:
    """None when bcc finds this kernel's own headers; else a merged Debian header tree."""
    if Path(f"/lib/modules/{platform.release()}/build/include").is_dir():
        return None
    archs = sorted(
        (
            p
            for p in glob.glob("/usr/src/linux-headers-*-amd64")
            if "-cloud-" not in p and "-rt-" not in p
        ),
        key=_version_key,
    )
    if not archs:
        raise BuildError("no kernel headers: install this kernel's headers or run `make setup`")
    arch = Path(archs[-1])
    common = Path(str(arch).removesuffix("-amd64") + "-common")
    if not common.is_dir():
        raise BuildError(f"{arch} has no matching {common}")
    merged = HEADER_CACHE / arch.name
    stamp = merged / ".complete"
    if not stamp.exists():
        merged.mkdir(parents=True, exist_ok=True)
        # A symlink farm: common first, then the arch tree's generated files on top.
        for src in (common, arch):
            subprocess.run(["cp", "-asf", f"{src}/.", str(merged)], check=True)
        stamp.write_text(f"{common}\n{arch}\n")
    return merged


def mount_type(path: Path) -> str:
    """The file system type of the mount that holds `path`."""
    best, fstype = "", ""
    resolved = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount_point = fields[4]
            sep = fields.index("-")
            if (
                resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
            ) and len(mount_point) >= len(best):
                best, fstype = mount_point, fields[sep + 1]
    return fstype


def ensure_bpffs(root: Path) -> bool:
    """`root` must be on a bpffs. Only the standard place is mounted when missing (True: this
    call mounted it); anywhere else is the operator's to mount."""
    if mount_type(root) == "bpf":
        return False
    if root != STANDARD_BPFFS:
        raise BuildError(f"{root} is not on a bpffs mount (pin_dir must be below one)")
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(root)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise BuildError(f"cannot mount bpffs at {root}: {proc.stderr.strip()}")
    return True


def use_kernel_headers() -> None:
    """Point bcc at a header tree for this kernel (BCC_KERNEL_SOURCE), when it needs one."""
    headers = kernel_source()
    if headers is not None:
        os.environ["BCC_KERNEL_SOURCE"] = str(headers)


def compile_programs(
    source: str, functions: tuple[str, ...], pin_dir: Path, chain_pin: Path
) -> tuple[Any, dict[str, int]]:
    """Compile bpf/<source> and load `functions` as TC classifiers; returns (BPF, name → fd).
    The maps are pinned in `pin_dir`, the walker's tail-call slot at `chain_pin`."""
    from bcc import BPF  # Debian's python3-bpfcc; imported late so unit tests need no bcc

    bpf_src = bpf_dir()
    src = bpf_src / source
    if not src.exists():
        raise BuildError(f"BPF source {src} is missing")
    use_kernel_headers()
    cflags = [
        f"-I{bpf_src}",
        f'-DFC_PIN_DIR="{pin_dir}"',
        f'-DFC_CHAIN_PIN="{chain_pin}"',
        "-Wno-everything",
    ]
    try:
        bpf = BPF(src_file=str(src).encode(), cflags=cflags)
        fds = {name: int(bpf.load_func(name.encode(), BPF.SCHED_CLS).fd) for name in functions}
    except Exception as exc:  # bcc raises bare Exception with the verifier's story on stderr
        raise BuildError(f"{source}: {exc}") from exc
    return bpf, fds
