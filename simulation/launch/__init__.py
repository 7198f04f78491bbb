"""Launchers of the app: Flower's simulation engine on a laptop or a Ray cluster, a local TLS
deployment, and the process supervision and certificates they need."""
