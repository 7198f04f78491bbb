"""``python -m simulation.benchmark``."""

import sys

from .benchmark import main

sys.exit(main())
