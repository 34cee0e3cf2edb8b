from __future__ import annotations

import platform

from forecast_lab import capability, netns, runner


def test_probe_answers_and_leaves_nothing_behind() -> None:
    before = set(netns.list_with_prefix("fcprobe"))
    cap = capability.probe()
    assert set(netns.list_with_prefix("fcprobe")) == before
    assert cap.release == platform.release()
    assert cap.describe().startswith(f"kernel {cap.release}:")
    # A "no" always carries the kernel's own reason.
    assert cap.esp or cap.esp_error
    assert cap.xfrm_interface or cap.xfrm_interface_error


def test_placement_follows_the_probe() -> None:
    cap = capability.probe()
    where = runner.place(here=False, libipsec=False).where
    assert where == ("here" if cap.can_run_lab else "vm")
    assert runner.place(here=True, libipsec=False).where == "here"
