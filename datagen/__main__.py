"""``python -m datagen run|plan|size`` (see datagen.run and datagen.sizing)."""

import sys

if sys.argv[1:2] == ["size"]:  # sizing reads JSON: no need to import the pipeline, Ray or torch
    from .sizing import cli

    sys.exit(cli(sys.argv[2:]))

from .run import main

sys.exit(main())
