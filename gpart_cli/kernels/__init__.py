"""Optional GPU kernels (Triton). The CPU path in `gpart_cli.layer` never needs them."""
