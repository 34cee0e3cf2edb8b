"""The lab: real strongSwan and real IPsec in network namespaces, on this kernel or in a VM."""
