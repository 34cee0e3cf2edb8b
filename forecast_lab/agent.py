"""Job agent inside the lab VM: runs the commands the host drops into the shared folder.

One boot serves a whole test session. Protocol, all files in <share>/jobs/:
  <id>.json   written by the host (atomically, by rename): {"argv", "env", "timeout", "cwd"}
  <id>.out    combined stdout/stderr, written while the job runs (the host may tail it)
  <id>.rc     the exit code, written last (atomically); 124 = the job's timeout ran out
  shutdown    ends the agent; the guest then powers off
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.05


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_job(spec_path: Path) -> None:
    job_id = spec_path.stem
    out_path = spec_path.with_name(f"{job_id}.out")
    rc_path = spec_path.with_name(f"{job_id}.rc")
    spec = json.loads(spec_path.read_text())
    env = {**os.environ, **spec.get("env", {})}
    with out_path.open("w", buffering=1) as out:
        try:
            proc = subprocess.Popen(
                spec["argv"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.get("cwd") or None,
                start_new_session=True,
            )
        except OSError as exc:
            out.write(f"agent: cannot start {spec['argv']!r}: {exc}\n")
            _write_atomic(rc_path, "127\n")
            return
        try:
            rc = proc.wait(timeout=float(spec.get("timeout", 600)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            out.write(f"agent: job timed out after {spec.get('timeout')} s\n")
            rc = 124
    _write_atomic(rc_path, f"{rc}\n")


def serve(share: Path) -> int:
    jobs = share / "jobs"
    jobs.mkdir(exist_ok=True)
    (share / "agent.ready").write_text(f"{os.getpid()}\n")
    done: set[str] = set()
    while not (jobs / "shutdown").exists():
        pending = sorted(p for p in jobs.glob("*.json") if p.stem not in done)
        if not pending:
            time.sleep(POLL_S)
            continue
        for spec in pending:
            done.add(spec.stem)
            run_job(spec)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--share", required=True, type=Path)
    args = parser.parse_args()
    return serve(args.share)


if __name__ == "__main__":
    sys.exit(main())
