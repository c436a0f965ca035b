"""Layout-fidelity metrics (CropCLIP, CropPickScore, SAMIoU, FID) and the ``evaluate`` job.

May import: ``training.inference`` (the shared preset and CLI helpers of ``generate``), ``training.model``,
``training.layout``, ``shards``, ``datagen``. Never ``training.data`` or ``training.trainer``.
"""
