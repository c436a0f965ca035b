"""The training run: its config, the loop, one step's loss, trainable weights, checkpoints and resume,
the accelerate set-up, FSDP2 sharding, the model set-up and validation images.

May import every package below it: ``training.data``, ``training.model``, ``training.inference``,
``training.layout``, ``shards``, ``datagen``. Never ``training.evaluation`` (its sibling).
"""
