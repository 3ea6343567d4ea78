"""``python -m pifa_modifier`` == ``pifa``."""

import sys

from pifa_modifier.cli import main

sys.exit(main())
