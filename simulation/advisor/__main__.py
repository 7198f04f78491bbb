"""``python -m simulation.advisor``."""

import sys

from .advisor import main

main()
sys.exit(0)
