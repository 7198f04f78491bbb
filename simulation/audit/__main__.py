"""``python -m simulation.audit``."""

import sys

from .audit import main

main()
sys.exit(0)
