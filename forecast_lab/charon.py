"""One real charon per lab host: its own netns, its own /run, its own VICI socket
(docs/design.md, The lab)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import vici

from forecast_lab import ipsec_state

CHARON = "/usr/lib/ipsec/charon"


class CharonError(RuntimeError):
    """charon could not be started or driven; the message names the instance and the step."""


def render_strongswan_conf(
    *, workdir: Path, plugins: list[str], plugin_options: dict[str, dict[str, str]]
) -> str:
    options = "".join(
        f"    {plugin} {{\n" + "".join(f"      {k} = {v}\n" for k, v in opts.items()) + "    }\n"
        for plugin, opts in plugin_options.items()
    )
    return f"""charon {{
  load_modular = no
  load = {" ".join(plugins)}
  retransmit_tries = 3
  retransmit_timeout = 2.0
  # Labs of hundreds of IKE_SAs: a hashed table (the default is one bucket, a linear scan per
  # message), and no cookies or per-peer limits for clients that all connect at once.
  ikesa_table_size = 1024
  ikesa_table_segments = 16
  dos_protection = no
  block_threshold = 1000
  # Reauthentication builds the new IKE_SA and its children before deleting the old ones (the
  # default of strongSwan 6): break-before-make loses traffic for a round trip, any forwarder.
  make_before_break = yes
  filelog {{
    lab {{
      path = {workdir}/charon.log
      time_format = %T
      default = 1
      knl = 1
      append = no
      flush_line = yes
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{workdir}/charon.vici
    }}
{options}  }}
}}
"""


class CharonInstance:
    def __init__(
        self,
        name: str,
        netns: str,
        workdir: Path,
        plugins: list[str],
        plugin_options: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.name = name
        self.netns = netns
        # Not under /run: that is replaced by this instance's own directory (the pid file path
        # is compiled in and locked; two charons on one /run break each other).
        self.workdir = workdir
        self.plugins = plugins
        self.plugin_options = plugin_options or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def vici_socket(self) -> Path:
        return self.workdir / "charon.vici"

    @property
    def log_path(self) -> Path:
        return self.workdir / "charon.log"

    def start(self, timeout: float = 20) -> None:
        for plugin in self.plugins:
            if not Path(f"/usr/lib/ipsec/plugins/libstrongswan-{plugin}.so").exists():
                raise CharonError(f"{self.name}: strongSwan plugin {plugin} is not installed")
        rundir = self.workdir / "run"
        rundir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "strongswan.conf"
        conf.write_text(
            render_strongswan_conf(
                workdir=self.workdir, plugins=self.plugins, plugin_options=self.plugin_options
            )
        )
        script = f'mount --bind "{rundir}" /run && exec env STRONGSWAN_CONF="{conf}" {CHARON}'
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=(self.workdir / "charon.stdout").open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CharonError(
                    f"{self.name}: charon exited {self.proc.returncode}:\n" + self.log_tail()
                )
            try:
                with self.session():
                    return
            except OSError:
                time.sleep(0.05)
        raise CharonError(f"{self.name}: VICI socket {self.vici_socket} not up in {timeout} s")

    def log_tail(self, lines: int = 25) -> str:
        texts = []
        for path in (self.workdir / "charon.stdout", self.log_path):
            with suppress(FileNotFoundError):
                texts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(texts)

    @contextmanager
    def session(self) -> Iterator[Any]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.vici_socket))
            yield vici.Session(sock)
        finally:
            sock.close()

    def load(
        self,
        *,
        conns: dict[str, Any],
        secrets: list[dict[str, Any]],
        pools: dict[str, Any] | None = None,
    ) -> None:
        with self.session() as s:
            for secret in secrets:
                s.load_shared(secret)
            if pools:
                s.load_pool(pools)
            s.load_conn(conns)

    def initiate(self, *, ike: str, child: str, timeout_ms: int = 15000) -> None:
        try:
            with self.session() as s:
                for _log in s.initiate({"ike": ike, "child": child, "timeout": timeout_ms}):
                    pass
        except Exception as exc:  # vici raises its own CommandException on failure
            raise CharonError(
                f"{self.name}: initiate {ike}/{child} failed: {exc}\n" + self.log_tail()
            ) from exc

    def command(self, name: str, args: dict[str, Any]) -> None:
        """A VICI command that streams log messages (rekey, terminate); raises on failure."""
        try:
            ipsec_state.command(str(self.vici_socket), name, args)
        except Exception as exc:
            raise CharonError(f"{self.name}: {name} {args} failed: {exc}") from exc

    def list_sas(self) -> list[dict[str, Any]]:
        with self.session() as s:
            return list(s.list_sas())

    def stop(self, timeout: float = 10) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.vici_socket.exists():
            os.unlink(self.vici_socket)
