"""``python -m simulation.launch``: the app on Flower's simulation engine."""

import sys

from .simulation_engine import main

sys.exit(main())
