"""Evaluation: answer extraction, metrics, and task runners (docs/design.md §7)."""
