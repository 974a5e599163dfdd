"""Evaluation: figures (and, later, Dice and privacy metrics)."""
