"""``python -m datagen run|plan`` (see datagen.run)."""

import sys

from .run import main

sys.exit(main())
