"""What a layout is, below everything that uses one: region reorganization (boxes and descriptions ->
non-overlapping region slots, padded to fixed shapes), the layout files generation reads and evaluation
scores against (LayoutSAM-Eval's parquet rows: ``layoutsam``), and the layouts of a dataset's samples (``dataset``).

May import: ``shards``. Nothing else of ``training``: the data stream and the model both build on it.
"""
