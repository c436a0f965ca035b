"""``python -m training.generate``: generate images from layouts. The code lives in ``training.inference.generate``."""

from training.inference.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
