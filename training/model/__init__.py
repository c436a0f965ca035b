"""The regional-attention model: position net and regional cross-attention, ``casa``, the adapter attached
to a stock diffusers UNet through its GLIGEN hooks, the sequenced grounding encoding, LoRA, the release's
checkpoint formats, adapter initialisation and the tiny offline builds of the base models.

May import: ``training.layout``, ``shards``, ``datagen``. Never ``training.data`` (its sibling) or anything
above (inference, evaluation, trainer).
"""
