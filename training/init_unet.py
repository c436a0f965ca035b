"""``python -m training.init_unet``: initialise the regional adapter on a base UNet. The code lives in ``training.model.init_adapter``."""

from training.model.init_adapter import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m training.init_unet"))
