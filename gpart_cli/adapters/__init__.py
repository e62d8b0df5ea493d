"""Interop with other GPart implementations: the authors' PEFT fork (`peft_gpart`, `convert`)."""
