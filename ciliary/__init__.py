"""ciliary: a Kubernetes networking data plane with an eBPF datapath."""

__version__ = "0.1.0"
