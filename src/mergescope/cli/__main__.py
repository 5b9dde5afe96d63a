"""``python -m mergescope.cli``."""
import sys

from . import main

sys.exit(main())
