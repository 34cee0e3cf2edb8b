"""What a chunk size costs on this kernel: verifier instructions and load time per program.

The walkers copy FC_CHUNK list entries per run and tail-call themselves up to FC_TAIL_CALLS
times, so the table holds FC_CHUNK * FC_TAIL_CALLS SAs (bpf/forecast.h). This compiles copies of
bpf/ with other chunk sizes and loads every program, printing one line per program and size:

    python3 scripts/verifier_cost.py 64 256 512 1024     (as root; in the lab: `forecast-bpf
    lab run scripts/verifier_cost.py --kernel 6.12 -- 256 512`)

A size the verifier rejects prints its reason (the last line of the verifier's log).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forecast import bpf_build, datapath, layout
from forecast.pinned import prog_info


def _sized_copy(src: Path, dst: Path, chunk: int) -> None:
    shutil.copytree(src, dst)
    header = dst / "forecast.h"
    text = header.read_text()
    tail_calls = int(re.search(r"#define FC_TAIL_CALLS (\d+)", text)[1])  # type: ignore[index]
    text = re.sub(r"#define FC_CHUNK \d+", f"#define FC_CHUNK {chunk}", text)
    text = re.sub(r"#define FC_MAX_SAS \d+", f"#define FC_MAX_SAS {chunk * tail_calls}", text)
    header.write_text(text)


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """libbcc writes the verifier's log to file descriptor 2 itself."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("w") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def measure(chunk: int, work: Path) -> list[str]:
    bpf_src = work / f"bpf-{chunk}"
    _sized_copy(bpf_build.bpf_dir(), bpf_src, chunk)
    os.environ["FORECAST_BPF_DIR"] = str(bpf_src)
    pins = work / f"pins-{chunk}"
    pins.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(pins)], check=True)
    lines = []
    try:
        for role, (source, entry, walkers) in datapath.PROGRAMS.items():
            t0 = time.monotonic()
            try:
                with _stderr_to(work / "verifier.log"):
                    bpf, fds = bpf_build.compile_programs(
                        source, (entry, *walkers), pins, pins / f"chain-{role}"
                    )
            except bpf_build.BuildError as exc:
                log = (work / "verifier.log").read_text(errors="replace").splitlines()
                why = [ln for ln in log if "too complex" in ln or "limit" in ln or "invalid" in ln]
                lines.append(f"{chunk:>6} {role:<7} rejected: {why[0] if why else exc}")
                continue
            seconds = time.monotonic() - t0
            costs = {name: prog_info(fd).verified_insns for name, fd in fds.items()}
            bpf.cleanup()
            lines.append(
                f"{chunk:>6} {role:<7} capacity {chunk * layout.FC_TAIL_CALLS:>6}  "
                + "  ".join(f"{n} {c:>7} insns" for n, c in costs.items())
                + f"  compile+load {seconds:.2f} s"
            )
    finally:
        subprocess.run(["umount", str(pins)], check=False)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chunks", nargs="*", type=int, default=[64, 256, 512, 1024])
    args = parser.parse_args()
    print(f"kernel {platform.release()}, bcc {bpf_build.bcc_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in args.chunks:
            for line in measure(chunk, Path(tmp)):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
