"""The method: config, layer, model surgery, artifact, swap (docs/design.md §1, §3, §4)."""
