"""Stream-train, run and score the regional-attention layout-to-image model (docs/METHOD.md)."""

import logging

# diffusers imports bitsandbytes when it is installed (our `dev`/`bnb` extras), and on CPU bitsandbytes
# then warns that it could not fetch an optional 4-bit kernel from the hub (and `kernels` that it skipped
# a trust check offline). We never run 4-bit kernels, and the two lines came with every command, even
# `--help`: keep their errors, drop their warnings.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)
