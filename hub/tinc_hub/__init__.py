"""tinc-hub: the hub side of self-enrolling tinc 1.0 VPNs."""

__version__ = "0.1.0"
