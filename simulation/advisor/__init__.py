"""Which cut layer: each cut's costs to the client, its accuracy and its leakage:
``python -m simulation.advisor``."""
