"""Layout-fidelity metrics (CropCLIP, CropPickScore, SAMIoU, FID), LayoutSAM-Eval's VLM scores (``layoutsam``)
and the ``evaluate`` job.

May import: ``training.inference`` (the presets and CLI rule it shares with ``generate``: ``presets``), ``training.model``,
``training.layout``, ``shards``, ``datagen``. Never ``training.data`` or ``training.trainer``.
"""
