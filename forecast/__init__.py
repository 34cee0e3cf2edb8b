"""forecast-bpf: multicast and broadcast forwarding across strongSwan IPsec tunnels with eBPF."""

__version__ = "0.1.0"
