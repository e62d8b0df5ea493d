"""The recipe schema and the method registry it names (docs/design.md §6)."""
