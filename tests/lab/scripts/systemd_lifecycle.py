"""Lab script: forecast-bpf installed from its Debian package and run by a real systemd (PID 1
of the lab VM), on the lab gateway, while the LAN sends multicast at 200 packets/s to every
client and each client counts every copy by sequence number.

install → start → reload → restart → upgrade (a second build of the package) → kill -9 →
watchdog (a hung daemon; an SA ends meanwhile) → each capability taken away in turn (a cold start
without it must fail; CAP_NET_RAW with iptables-legacy) → stop → purge. After every step the kernel
holds exactly the live SAs (slots, MARK rules, routes, filters, pins); after stop and purge
nothing is left. Prints one RESULT line per check; exits 1 on failure.

Arguments: DEB1 DEB2 (two builds of the package). Run with --gateway-mode forecast-bpf.
The lab drop-in only says where the gateway lives (its network namespace) and shortens the
watchdog so a hang is caught within seconds; run it with TMPDIR outside /tmp (e.g. /srv) so the
lab's charon socket is where the service can see it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forecast import netfilter
from forecast_lab import conns, ipsec_state, traffic
from forecast_lab.checks import CheckResult
from forecast_lab.topology import Topology

# `ip netns exec` gave this script a mount namespace of its own; systemd's is the one that
# matters here (its /run: runtime directory, journal, bind-mount targets; its bpffs). Enter it,
# staying in the gateway's network namespace.
if os.environ.get("FORECAST_LAB_SYSTEMD_VIEW") != "1":
    os.execvpe(
        "nsenter",
        ["nsenter", "--mount=/proc/1/ns/mnt", "--", sys.executable, *sys.argv],
        {**os.environ, "FORECAST_LAB_SYSTEMD_VIEW": "1"},
    )

topo = Topology.load(os.environ["FORECAST_LAB_TOPOLOGY"])
DEB1, DEB2 = sys.argv[1], sys.argv[2]
UNIT = "forecast-bpf.service"
GROUP, PORT = "239.255.255.250", 5353
RATE = 200  # packets/s from the LAN
XFRM = "fcxfrm0"
PIN_DIR = "/sys/fs/bpf/forecast-bpf"
CONFIG = Path("/etc/forecast-bpf/forecast-bpf.yaml")
DROPIN = Path(f"/etc/systemd/system/{UNIT}.d/lab.conf")
GW = topo.gateway.netns
results: list[CheckResult] = []
failed = False


def report(name: str, ok: bool, detail: dict[str, Any] | None = None) -> bool:
    global failed
    result = CheckResult(name, ok, detail or {})
    results.append(result)
    failed |= not ok
    print("RESULT " + json.dumps(result.as_dict()), flush=True)
    return ok


def sh(*argv: str, check: bool = True, timeout: float = 300) -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def prop(name: str) -> str:
    return sh("systemctl", "show", "-P", name, UNIT).strip()


def main_pid() -> int:
    return int(prop("MainPID") or 0)


def wait_for(what: str, pred: Callable[[], bool], seconds: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}; journal:\n{journal()[-3000:]}")


def journal() -> str:
    return sh("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", check=False)


def ready_seconds() -> float:
    """From the main process's start to READY=1 (systemd's own timestamps)."""
    start = int(prop("ExecMainStartTimestampMonotonic"))
    active = int(prop("ActiveEnterTimestampMonotonic"))
    return round((active - start) / 1e6, 2)


def live_vips() -> set[str]:
    return {
        c["remote-vips"].split()[0]
        for c in ipsec_state.child_sas(topo.gateway.vici_socket)
        if c["remote-vips"]
    }


def kernel_state() -> dict[str, Any]:
    """What the kernel holds of forecast-bpf, read from the kernel and the pinned maps."""
    slots: list[dict[str, Any]] = []
    if os.path.exists("/usr/bin/forecast-bpf"):  # not after the purge
        status = subprocess.run(
            ["forecast-bpf", "status", "--json"], capture_output=True, text=True
        )
        slots = json.loads(status.stdout)["sas"] if status.returncode in (0, 1) else []
    holders = netfilter.holding()
    rules = [line for held in holders for line in held.current()]
    filters = {
        dev: re.findall(
            r"\b(fc_\w+-[0-9a-f]{12})\b",
            sh("tc", "filter", "show", "dev", dev, "ingress", check=False),
        )
        for dev in (topo.gw_lan_if, XFRM)
    }
    pins = sh("sh", "-c", f"ls {PIN_DIR} 2>/dev/null", check=False).split()
    return {
        "slot_vips": sorted(v for s in slots for v in s["virtual_ips"]),
        "rule_vips": sorted({m[1] or m[2] for line in rules if (m := RULE_VIP.match(line))}),
        "route_vips": sorted(
            line.split()[0] for line in sh("ip", "-4", "route", "show", "proto", "252").splitlines()
        ),
        "filters": filters,
        "pins": pins,
        "rules_in": [held.detail for held in holders],
        "xfrm_link": XFRM in sh("ip", "-br", "link"),
    }


ROLES = ("lan", "tunnel")
# A client's address in a MARK rule, as iptables or nft prints it.
RULE_VIP = re.compile(r"^(?:-A FORECAST-\S+ -d (\S+)/32 |(?:prerouting|output) ip daddr (\S+) )")


def kernel_is_live() -> tuple[bool, list[str], dict[str, Any]]:
    """(ok, the live VIPs, what the kernel holds): see state_is_live."""
    want = sorted(live_vips())
    k = kernel_state()
    builds = {name.rsplit("-", 1)[-1] for names in k["filters"].values() for name in names}
    build = next(iter(builds)) if len(builds) == 1 else "?"
    maps = [p for p in k["pins"] if p.startswith("maps-")]
    ok = (
        k["slot_vips"] == k["rule_vips"] == k["route_vips"] == want
        and all(len(names) == 1 for names in k["filters"].values())
        and len(builds) == 1
        and len(maps) == 1
        and sorted(k["pins"])
        == sorted(
            [*maps, *(f"{kind}-{build}-{role}" for kind in ("prog", "chain") for role in ROLES)]
        )
    )
    return ok, want, k


def state_is_live(step: str) -> None:
    """The kernel holds exactly the live SAs: same VIPs in slots, rules, routes; one build's
    filters on both devices and only that build's pins."""
    ok, want, k = kernel_is_live()
    report(f"{step}: the kernel holds exactly the live SAs", ok, {"live": want, **k})


CAPS_DROPIN = DROPIN.with_name("caps.conf")


def without_capability(cap: str, bounding: list[str]) -> dict[str, Any]:
    """A cold start (stop removes the data path; start compiles, pins, attaches, applies the
    snapshot) with `cap` taken out of the unit's bounding set: does it come up whole?"""
    CAPS_DROPIN.write_text(
        "[Service]\nCapabilityBoundingSet=\n"
        f"CapabilityBoundingSet={' '.join(c for c in bounding if c != cap)}\n"
    )
    sh("systemctl", "daemon-reload")
    sh("systemctl", "stop", UNIT)
    since = len(journal())
    started = (
        subprocess.run(
            ["systemctl", "start", UNIT], capture_output=True, text=True, timeout=180
        ).returncode
        == 0
    )
    time.sleep(1.0)  # a failure right after READY would show now
    status = subprocess.run(["forecast-bpf", "status", "--json"], capture_output=True, text=True)
    errors = json.loads(status.stdout)["daemon"]["sync_errors"] if status.returncode == 0 else None
    ok = started and prop("ActiveState") == "active" and errors == 0 and kernel_is_live()[0]
    log = journal()[since:]
    sh("systemctl", "stop", UNIT, check=False)
    sh("systemctl", "reset-failed", UNIT, check=False)
    why = [ln for ln in log.splitlines() if "rror" in ln or "denied" in ln or "EPERM" in ln]
    return {"works": ok, "started": started, "sync_errors": errors, "why": why[:3]}


def nothing_left(step: str) -> None:
    k = kernel_state()
    left = {
        "slots": k["slot_vips"],
        "rules": k["rule_vips"],
        "rules_in": k["rules_in"],
        "routes": k["route_vips"],
        "filters": {dev: names for dev, names in k["filters"].items() if names},
        "pins": k["pins"],
        "xfrm_link": k["xfrm_link"],
        "run_dir": os.path.exists("/run/forecast-bpf"),
        "pin_dir": bool(sh("sh", "-c", f"ls -d {PIN_DIR} 2>/dev/null", check=False)),
    }
    report(f"{step}: nothing of forecast-bpf left in the kernel", not any(left.values()), left)


# -- set-up ---------------------------------------------------------------------------------
CONFIG.parent.mkdir(parents=True, exist_ok=True)
base_config = (
    f"interface: {topo.gw_lan_if}\n"
    "reinject: [rw]\n"
    f"groups: [{GROUP}, 224.0.0.251]\n"
    f"xfrm: {{name: {XFRM}, if_id: {topo.extra['if_id']}, dev: {topo.gw_wan_if}}}\n"
    f"vici_socket: {topo.gateway.vici_socket}\n"
)
CONFIG.write_text(base_config)
DROPIN.parent.mkdir(parents=True, exist_ok=True)
DROPIN.write_text(
    f"[Service]\nNetworkNamespacePath=/run/netns/{GW}\nWatchdogSec=5s\nTimeoutAbortSec=3s\n"
)
receivers = {
    c.name: traffic.Receiver(c.netns, PORT, [GROUP], seconds=900, wait=False) for c in topo.clients
}
for r in receivers.values():
    r.wait_ready()
phases: dict[str, dict[str, Any]] = {}


def phase(tag: str, action: Callable[[], dict[str, Any]], seconds: float = 10.0) -> None:
    """The LAN sends at RATE for `seconds`; `action` runs 1.5 s in."""
    count = int(RATE * seconds)
    sender = traffic.send(
        topo.lan_host.netns,
        GROUP,
        PORT,
        tag,
        count,
        iface="eth0",
        interval=1 / RATE,
        background=True,
    )
    assert sender is not None
    time.sleep(1.5)
    detail = action()
    if sender.wait(timeout=seconds * 6 + 120) != 0:
        raise RuntimeError(f"sender {tag} failed: {sender.stderr.read() if sender.stderr else ''}")
    phases[tag] = {"count": count, **detail}


try:
    # -- install: postinst enables and starts it ------------------------------------------
    t0 = time.monotonic()
    sh("apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", DEB1, timeout=600)
    install_s = time.monotonic() - t0
    wait_for("the service active (READY)", lambda: prop("ActiveState") == "active", 120)
    report(
        "install: apt installs the package, systemd starts it, READY after the first snapshot",
        prop("SubState") == "running" and "programs build" in journal(),
        {
            "install_s": round(install_s, 1),
            "start_to_ready_s": ready_seconds(),
            "version": sh("dpkg-query", "-W", "-f=${Version}", "forecast-bpf"),
        },
    )
    state_is_live("start")

    # -- reload: groups and log level in place ---------------------------------------------
    def reload() -> dict[str, Any]:
        pid = main_pid()
        CONFIG.write_text(
            base_config.replace(
                f"groups: [{GROUP}, 224.0.0.251]", f"groups: [{GROUP}, 224.0.0.251, 224.0.0.252]"
            )
            + "log_level: debug\n"
        )
        sh("systemctl", "reload", UNIT)
        wait_for("reloaded", lambda: "reloaded " in journal(), 60)
        maddr = sh("ip", "maddr", "show", "dev", topo.gw_lan_if)
        return {"same_pid": main_pid() == pid, "joined_224.0.0.252": "224.0.0.252" in maddr}

    phase("reload", reload)
    report(
        "reload: same process, new group joined",
        phases["reload"]["same_pid"] and phases["reload"]["joined_224.0.0.252"],
        phases["reload"],
    )
    state_is_live("reload")

    # -- restart: hand-over, adopted without a compile, groups kept ------------------------
    def restart() -> dict[str, Any]:
        pid = main_pid()
        t = time.monotonic()
        sh("systemctl", "restart", UNIT)
        return {
            "new_pid": main_pid() != pid,
            "restart_s": round(time.monotonic() - t, 2),
            "start_to_ready_s": ready_seconds(),
        }

    phase("restart", restart)
    log = journal()
    report(
        "restart: the data path is handed over and adopted (no compile, filters kept, "
        "groups from systemd's store)",
        phases["restart"]["new_pid"]
        and "stopped for a restart; the data path keeps forwarding" in log
        and "adopted from" in log
        and "(forwarding never stopped)" in log
        and "group memberships taken over from the previous daemon" in log,
        phases["restart"],
    )
    state_is_live("restart")

    # -- upgrade: a second build of the package --------------------------------------------
    def upgrade() -> dict[str, Any]:
        pid = main_pid()
        t = time.monotonic()
        sh("apt-get", "install", "-y", "-q", DEB2, timeout=600)
        wait_for("active after the upgrade", lambda: prop("ActiveState") == "active", 120)
        return {
            "new_pid": main_pid() != pid,
            "upgrade_s": round(time.monotonic() - t, 1),
            "version": sh("dpkg-query", "-W", "-f=${Version}", "forecast-bpf"),
        }

    phase("upgrade", upgrade, seconds=30.0)
    report(
        "upgrade: the new package's daemon took over",
        phases["upgrade"]["new_pid"] and phases["upgrade"]["version"] != "",
        phases["upgrade"],
    )
    state_is_live("upgrade")

    # -- kill -9: systemd restarts it, forwarding never stops ------------------------------
    def crash() -> dict[str, Any]:
        pid, restarts = main_pid(), int(prop("NRestarts"))
        t = time.monotonic()
        sh("kill", "-9", str(pid))
        wait_for(
            "restarted", lambda: main_pid() not in (0, pid) and prop("ActiveState") == "active"
        )
        return {
            "restarted_s": round(time.monotonic() - t, 2),
            "start_to_ready_s": ready_seconds(),
            "restarted_by_systemd": int(prop("NRestarts")) == restarts + 1,
        }

    phase("crash", crash)
    report(
        "kill -9: systemd restarted the daemon",
        phases["crash"]["restarted_by_systemd"],
        phases["crash"],
    )
    state_is_live("kill -9")

    # -- a hung daemon: the watchdog restarts it; an SA that ended meanwhile is removed ----
    gone = topo.clients[-1]

    def hang() -> dict[str, Any]:
        pid = main_pid()
        sh("kill", "-STOP", str(pid))
        ipsec_state.command(
            gone.vici_socket, "terminate", {"ike": conns.CLIENT_CONN, "timeout": 5000}
        )
        wait_for(
            "the watchdog's restart",
            lambda: main_pid() not in (0, pid) and prop("ActiveState") == "active",
            120,
        )
        # READY=1 follows the first reconcile: at READY the gone SA must already be out.
        routes = sh("ip", "-4", "route", "show", "proto", "252")
        rules = "\n".join(line for held in netfilter.holding() for line in held.current())
        return {
            "watchdog_fired": "Watchdog timeout" in journal(),
            "gone_at_ready": gone.virtual_ip not in routes and gone.virtual_ip not in rules,
            "start_to_ready_s": ready_seconds(),
        }

    phase("watchdog", hang, seconds=25.0)
    report(
        f"watchdog: a hung daemon is restarted; {gone.name}, gone meanwhile, is removed",
        phases["watchdog"]["watchdog_fired"] and phases["watchdog"]["gone_at_ready"],
        phases["watchdog"],
    )
    state_is_live("watchdog")

    # -- every copy, counted by sequence number --------------------------------------------
    got = {name: r.stop() for name, r in receivers.items()}
    receivers = {}
    for tag, info in phases.items():
        per_client = {}
        ok = True
        for c in topo.clients:
            seen = got[c.name].for_tag(tag)
            n = info["count"]
            if tag == "watchdog" and c.name == gone.name:
                per_client[c.name] = {"received": sum(seen.values()), "note": "disconnected"}
                continue
            lost = n - len(seen)
            dup = sum(seen.values()) - len(seen)
            per_client[c.name] = {
                "sent": n,
                "received": sum(seen.values()),
                "lost": lost,
                "duplicates": dup,
            }
            ok &= lost == 0 and dup == 0
        report(f"{tag}: every copy reached every client exactly once", ok, per_client)

    # -- least privilege: each capability taken away in turn --------------------------------
    bounding = sorted(prop("CapabilityBoundingSet").split())
    # CAP_NET_RAW: iptables-legacy talks to the kernel through a raw socket, and so does the
    # local output path's sender (opened at start); that one is taken away with legacy, the
    # others with nft.
    trials = {
        f"{cap} (nf_tables)": without_capability(cap, bounding)
        for cap in bounding
        if cap != "cap_net_raw"
    }
    if "cap_net_raw" in bounding:
        switch = ["update-alternatives", "--quiet", "--set", "iptables"]
        sh(*switch, "/usr/sbin/iptables-legacy")
        try:
            trials["cap_net_raw (legacy)"] = without_capability("cap_net_raw", bounding)
            # The control: with all three, legacy comes up whole.
            trials["none taken (legacy)"] = without_capability("", bounding)
        finally:
            sh(*switch, "/usr/sbin/iptables-nft")
    CAPS_DROPIN.unlink()
    sh("systemctl", "daemon-reload")
    sh("systemctl", "start", UNIT)
    needed = {
        cap
        for cap in bounding
        if any(not t["works"] for name, t in trials.items() if name.startswith(cap + " "))
    }
    report(
        "least privilege: each capability of the unit is one a cold start fails without "
        "(CAP_NET_RAW: with iptables-legacy, which comes up with all three)",
        needed == set(bounding) and trials.get("none taken (legacy)", {}).get("works", False),
        {"bounding_set": bounding, "needed": sorted(needed), "trials": trials},
    )
    state_is_live("all capabilities back")

    # -- stop, then purge: nothing left ----------------------------------------------------
    sh("systemctl", "stop", UNIT)
    report(
        "stop: clean exit",
        prop("ActiveState") == "inactive" and "stopped; everything removed" in journal(),
        {"result": prop("Result")},
    )
    nothing_left("stop")
    owned = [p for p in sh("dpkg", "-L", "forecast-bpf").split() if "forecast" in p]
    DROPIN.unlink()
    DROPIN.parent.rmdir()
    sh("apt-get", "purge", "-y", "-q", "forecast-bpf", timeout=600)
    left_files = [p for p in owned if os.path.lexists(p)]
    extra = [
        p
        for p in (
            "/etc/forecast-bpf",
            "/var/cache/forecast-bpf",
            "/run/forecast-bpf",
            "/etc/systemd/system/multi-user.target.wants/forecast-bpf.service",
        )
        if os.path.lexists(p)
    ]
    users = [line for line in sh("getent", "passwd").splitlines() if "forecast" in line]
    report(
        "purge: no file, directory, unit link or user left",
        not left_files
        and not extra
        and not users
        and not sh("dpkg-query", "-W", "forecast-bpf", check=False).strip(),
        {"files": left_files, "dirs": extra, "users": users, "owned_before": len(owned)},
    )
    nothing_left("purge")
except Exception as exc:  # a scenario step failed: say which, with the journal
    report(f"scenario aborted: {exc}", False, {"journal": journal()[-4000:]})
finally:
    for r in receivers.values():
        r.stop()
    CAPS_DROPIN.unlink(missing_ok=True)
    if DROPIN.exists():
        subprocess.run(["systemctl", "stop", UNIT], check=False, capture_output=True)

sys.exit(1 if failed else 0)
