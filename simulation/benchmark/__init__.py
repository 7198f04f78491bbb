"""How fast SplitFed is, measured against baselines in the same process:
``python -m simulation.benchmark``."""
