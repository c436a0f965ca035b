"""``python -m datagen run|plan|size``: the command line is ``datagen.cli``."""

import sys

from .cli import main

sys.exit(main())
