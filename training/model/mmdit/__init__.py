"""The regional adapter on MM-DiT backbones (SD3 / SD3.5 and FLUX.1 on stock diffusers transformers): the
token-grid layout and region-text encoder (``encoding``), the fusers attached through module hooks
(``adapter``), the block-sparse flex-attention form for GPUs (``flex``), the adapter's config and the base's
backbone (``config``), and the tiny offline builds (``tiny``). docs/METHOD.md §10.

Part of ``training.model``: imports ``training.model``'s modules, ``training.layout``, ``shards``; nothing above.
"""
