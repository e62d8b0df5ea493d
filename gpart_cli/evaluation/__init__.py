"""Evaluation: answer extraction, metrics, and task runners (DESIGN §7)."""
