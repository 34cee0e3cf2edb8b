#!/bin/sh
# Stage 2 (PID 1 on the host's read-only tree, or a service under systemd with --under-systemd):
# kernel file systems, then the job agent; the guest powers off when the agent exits. Nothing
# here may exit without powering off.
share=/run/forecast-lab-share
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
if [ "$1" != --under-systemd ]; then
  # systemd mounts these itself (bpffs at /sys/fs/bpf included).
  mkdir -p /dev/pts && mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
  mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
  mount -t debugfs debugfs /sys/kernel/debug
  mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
  mount -t bpf bpf /sys/fs/bpf
  mount -t cgroup2 cgroup2 /sys/fs/cgroup
fi
mkdir -p /run/netns /run/lock /var/run
hostname forecast-lab
ip link set lo up
. "$share/guest.env"
echo "$(cut -d' ' -f1 /proc/uptime)" >"$share/booted"
for m in $FORECAST_GUEST_MODULES; do modprobe "$m" || echo "stage2: modprobe $m failed"; done
# `forecast-bpf lab shell` talks to this console: a shell in the running lab's gateway (or a
# plain one when no lab is up), started again whenever it exits.
if [ -e /dev/hvc0 ]; then
  cat >/run/forecast-lab-shellrc <<RC
PS1='[lab vm] \\w# '
cd "$FORECAST_REPO"
if ls /run/forecast-lab/lab-*.json >/dev/null 2>&1; then
  SHELL=/bin/bash exec "$FORECAST_PYTHON" -m forecast lab shell
fi
RC
  # The pid lets `lab shell` start a fresh one (inside a lab brought up since the last).
  (while :; do
     setsid -c bash --rcfile /run/forecast-lab-shellrc -i </dev/hvc0 >/dev/hvc0 2>&1 &
     echo $! >/run/forecast-lab-console.pid
     wait $!
     sleep 0.3
   done) &
fi
cd "$FORECAST_REPO" && "$FORECAST_PYTHON" -m forecast_lab.agent --share "$share" >"$share/agent.log" 2>&1
echo $? >"$share/agent.rc"
sync
echo o >/proc/sysrq-trigger
sleep 10
