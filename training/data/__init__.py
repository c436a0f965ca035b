"""The training data stream: its config, the per-rank loader with exact epochs and resume state, the
worker-side stages (read, decode, augment, reorganize, collate) and their error policy.

May import: ``training.layout``, ``shards``, ``datagen``. Never ``training.model`` (its sibling) or anything
above (inference, evaluation, trainer): the stream knows nothing of the network it feeds.
"""
