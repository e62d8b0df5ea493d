"""Data per task family (DESIGN §6): GLUE text classification, vision classification, SFT for math."""
