"""Training: stages as data, optimiser groups, the loop, scale-out engines, checkpoints and the entry point.

Only :mod:`llava_uhd.cli` (through ``llava_uhd.commands.train``) imports this package; it imports the
model and the data pipeline, never the other way round (docs/design.md section 8).
"""
