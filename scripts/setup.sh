#!/usr/bin/env bash
# Installs everything forecast-bpf, its tests and its lab need on Debian 12, as root.
# Idempotent: a second run only checks stamps and exits in well under a second.
#
#   scripts/setup.sh            system packages + virtualenv
#   scripts/setup.sh --venv     only the virtualenv (for a non-root developer)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${FORECAST_VENV:-$here/.venv}
stamp_dir=${FORECAST_STAMP_DIR:-/var/lib/forecast-bpf}
apt_opts=(-y -q -o DPkg::Lock::Timeout=600 --no-install-recommends)

# Pinned lab kernels: the 6.1 line from the release suite, 6.12 from backports. Exact ABI
# names, so an upgrade never swaps the kernel under the lab's feet.
lab_kernel_61=${FORECAST_LAB_KERNEL_61:-6.1.0-57-amd64}
lab_kernel_612=${FORECAST_LAB_KERNEL_612:-6.12.95+deb12-amd64}

system_packages=(
  strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-extra-plugins
  python3 python3-venv python3-bpfcc bpfcc-tools linux-headers-amd64
  iproute2 iputils-ping iptables nftables ethtool tcpdump kmod socat
  qemu-system-x86 busybox-static cpio xz-utils zstd
  tmux vagrant make prometheus python3-matplotlib
)

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# The stamp records what was installed; a changed package list re-runs the install.
want_stamp() {
  printf '%s\n' "${system_packages[@]}" "$lab_kernel_61" "$lab_kernel_612" | sha256sum | cut -c1-16
}

# Debian's backports suite is served by the same mirror as the release suite: copy the
# URIs and keyring of the machine's own bookworm entry instead of naming a host here.
add_backports_source() {
  local codename target=/etc/apt/sources.list.d/forecast-bpf-backports.sources
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:?}")
  if grep -rqsE "^[^#]*${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  python3 "$here/scripts/apt_backports.py" "$codename" "$target"
}

install_system() {
  [ "$(id -u)" = 0 ] || die "system set-up needs root (run as root, or use --venv for the virtualenv only)"
  [ -r /etc/os-release ] && . /etc/os-release
  [ "${ID:-}" = debian ] || die "this set-up supports Debian 12; found ${PRETTY_NAME:-unknown}"
  mkdir -p "$stamp_dir"
  if [ "$(cat "$stamp_dir/system.stamp" 2>/dev/null)" = "$(want_stamp)" ]; then
    return 0
  fi
  log "apt-get update"
  apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
  # The backports derivation is Python; a minimal Debian may not have it yet.
  command -v python3 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" python3
  add_backports_source
  apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
  local new_services="" pkg
  for pkg in strongswan-charon:strongswan-starter.service prometheus:prometheus.service; do
    if ! dpkg-query -W -f='${Status}' "${pkg%%:*}" 2>/dev/null | grep -q "install ok installed"; then
      new_services="$new_services ${pkg#*:}"
    fi
  done
  log "installing ${#system_packages[@]} packages and lab kernels $lab_kernel_61, $lab_kernel_612"
  DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${system_packages[@]}" \
    "linux-image-$lab_kernel_61" "linux-headers-$lab_kernel_61"
  DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" -t "$(. /etc/os-release && echo "$VERSION_CODENAME")-backports" \
    "linux-image-$lab_kernel_612" "linux-headers-$lab_kernel_612"
  # Debian starts packaged services. Stop the ones this run newly installed (the lab and the
  # tests run their own charons and Prometheus); never touch a service the machine already
  # had: on an operator's gateway that would be their VPN or their monitoring.
  local unit
  for unit in $new_services; do
    log "disabling $unit (installed just now; the lab runs its own)"
    systemctl disable --now "$unit" >/dev/null 2>&1 || true
  done
  want_stamp >"$stamp_dir/system.stamp"
}

install_venv() {
  local py=/usr/bin/python3 want
  [ -x "$py" ] || die "$py missing: run set-up as root first"
  want=$(cat "$here/pyproject.toml" | sha256sum | cut -c1-16)
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.forecast-stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  log "creating virtualenv $venv (with Debian's bcc visible)"
  # --system-site-packages: bcc exists only as Debian's python3-bpfcc, never on PyPI.
  "$py" -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q -e "$here[dev]"
  "$venv/bin/python" -c 'import bcc, pyroute2, vici, yaml, prometheus_client' \
    || die "virtualenv imports failed"
  echo "$want" >"$venv/.forecast-stamp"
}

case "${1:-}" in
  --venv) install_venv ;;
  "") install_system; install_venv ;;
  *) die "unknown argument '$1' (use no argument, or --venv)" ;;
esac
