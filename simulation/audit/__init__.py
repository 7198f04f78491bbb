"""What the split server can infer from what it receives, with and without the defenses:
``python -m simulation.audit``."""
