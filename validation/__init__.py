"""Validation experiments with exact answers (not product code): ``python -m compartments validate ...``."""
