"""Data per task family (docs/design.md §6): GLUE text classification, vision classification, SFT for math."""
