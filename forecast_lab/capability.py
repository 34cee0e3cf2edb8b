"""Can this kernel run the lab directly? Probe ESP and XFRM interfaces in a scratch namespace."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from forecast_lab import netns


@dataclass(frozen=True)
class KernelCapability:
    release: str
    esp: bool
    xfrm_interface: bool
    esp_error: str
    xfrm_interface_error: str

    @property
    def can_run_lab(self) -> bool:
        return self.esp and self.xfrm_interface

    def describe(self) -> str:
        parts = [f"kernel {self.release}:"]
        parts.append("ESP yes" if self.esp else f"ESP no ({self.esp_error})")
        parts.append(
            "XFRM interfaces yes"
            if self.xfrm_interface
            else f"XFRM interfaces no ({self.xfrm_interface_error})"
        )
        return " ".join(parts)


def probe() -> KernelCapability:
    """Ask the kernel itself (not /proc/config): add an ESP state and an xfrm link, then drop them.

    Probing by doing is the only answer that survives modules, lockdown and kernels built without
    a config file; the scratch namespace keeps the host untouched.
    """
    name = netns.unique_prefix("fcprobe")
    netns.create(name)
    try:
        esp = netns.run(
            [
                "ip",
                "xfrm",
                "state",
                "add",
                "src",
                "192.0.2.1",
                "dst",
                "192.0.2.2",
                "proto",
                "esp",
                "spi",
                "0x100",
                "mode",
                "tunnel",
                "enc",
                "cbc(aes)",
                "0x" + "11" * 16,
                "auth-trunc",
                "hmac(sha256)",
                "0x" + "22" * 32,
                "128",
            ],
            netns=name,
            check=False,
        )
        xfrmi = netns.run(
            ["ip", "link", "add", "fcprobe0", "type", "xfrm", "dev", "lo", "if_id", "7"],
            netns=name,
            check=False,
        )
    finally:
        netns.delete(name)
    return KernelCapability(
        release=platform.release(),
        esp=esp.returncode == 0,
        xfrm_interface=xfrmi.returncode == 0,
        esp_error=esp.stderr.strip(),
        xfrm_interface_error=xfrmi.stderr.strip(),
    )
