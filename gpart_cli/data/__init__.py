"""Data per task family (docs/design.md §6): GLUE and your own text classes, vision, SFT (chat templates, packing)."""
