#!/bin/sh
# Lab script: proves the topology reaches the script and the script's exit code comes back.
for c in $FORECAST_LAB_CLIENTS; do
  ns=$(eval echo "\$FORECAST_LAB_$(echo "$c" | tr a-z A-Z)_NS")
  ip netns exec "$ns" true || exit 10
done
test -S "$FORECAST_LAB_GW_VICI_SOCKET" || exit 11
ip -br addr show dev "$FORECAST_LAB_GW_LAN_IF"
exit "${1:-0}"
