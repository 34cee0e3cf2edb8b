from __future__ import annotations

from pathlib import Path

import pytest

from forecast_lab import vm


def _modules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mods"
    d.mkdir()
    (d / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/net/9p/9pnet.ko.xz:\n"
        "kernel/fs/netfs/netfs.ko.xz:\n"
        "kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko.xz:\n"
    )
    (d / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    return d


def test_dependencies_load_first_once_each(tmp_path: Path) -> None:
    order = vm._load_order(
        _modules_dir(tmp_path), ("virtio_pci", "virtio_rng", "9pnet_virtio", "9p")
    )
    names = [Path(p).name for p in order]
    assert names.index("9pnet.ko.xz") < names.index("9pnet_virtio.ko.xz")
    assert names.index("netfs.ko.xz") < names.index("9p.ko.xz")
    assert names.count("9pnet.ko.xz") == 1
    assert "virtio-rng.ko.xz" in names  # dash/underscore spellings are one module


def test_missing_module_is_named(tmp_path: Path) -> None:
    with pytest.raises(vm.LabVMError, match="kernel module overlay is neither"):
        vm._load_order(_modules_dir(tmp_path), ("overlay",))


@pytest.mark.parametrize("line", ["6", "six", "6.1.0-57-amd64"])
def test_kernel_line_must_be_major_minor(line: str) -> None:
    with pytest.raises(vm.LabVMError, match="kernel must look like"):
        vm.GuestKernel.resolve(line)
