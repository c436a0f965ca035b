"""``python -m training.evaluate``: score generated images against their layouts. The code lives in ``training.evaluation.evaluate``."""

from training.evaluation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
