"""The speed machinery below the method (docs/design.md §3): one layer's ΔW build and ∂L/∂θ grouped sum, the
step's one ∂L/∂θ buffer and θ_s caches, the compiled CPU loops and the Triton kernels with their self-check and
dispatch. `gpart_cli/core/reference.py` is what they compute, written plainly."""
