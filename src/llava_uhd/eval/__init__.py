"""Evaluation: benchmarks scored as their authors score them (synthdoc: exact match on generated pages)."""
