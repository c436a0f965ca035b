"""``python -m training.init_adapter``: initialise the regional adapter on a base model (SDXL / SD1.5 UNet, SD3 /
FLUX.1 transformer). ``python -m training.init_unet`` is the same command. The code lives in
``training.model.init_adapter``."""

from training.model.init_adapter import main

if __name__ == "__main__":
    raise SystemExit(main())
