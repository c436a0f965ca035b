"""Layout-to-image generation: ``LayoutPipeline`` over the stock diffusers pipelines, and the
``generate`` job with its presets.

May import: ``training.model``, ``training.layout``, ``shards``, ``datagen``. Never ``training.data``,
``training.evaluation`` or ``training.trainer``.
"""
