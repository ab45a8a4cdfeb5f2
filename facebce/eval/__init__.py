"""Evaluation: verification, identification and uniform-classification metrics (one implementation each)."""
