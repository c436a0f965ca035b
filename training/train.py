"""``python -m training.train``: the trainer (accelerate launch -m training.train works too). The code lives in ``training.trainer.loop``."""

from training.trainer.loop import main

if __name__ == "__main__":
    raise SystemExit(main())
