"""bitsandbytes 4/8-bit bases (docs/design.md §3.5): what GPart needs to know of them, and a layout to avoid.

bitsandbytes' CPU backend repacks a `Linear4bit` weight into an AVX512-BF16 inference layout the first time
the layer runs in eval mode on an input without grad (an evaluation before training, say), and keeps it. That
layout's kernel (`gemv_4bit`) has no autograd formula, so from then on every gradient through the layer's
input is silently dropped: θ's gradient becomes 0 for every adapted layer below it (bitsandbytes 0.50; its
repacking also fails for in_features < the 64-value quantization block). GPart trains through these layers,
so `keep_autograd_layout` turns the repacking off (and refuses a layer that was already repacked: bitsandbytes'
inverse re-quantizes the scales, so the base would silently change).
"""

from __future__ import annotations

from torch import nn

from ..errors import GpartError


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4/8-bit linear, whose packed weight cannot take W0 + ΔW directly."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The logical (out, in) shape of a target's weight, also for packed quantized weights."""
    if is_quantized(module):
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def keep_autograd_layout(model: nn.Module) -> int:
    """Stop bitsandbytes' CPU inference repacking in every 4-bit layer of `model`; returns how many were changed.

    Raises:
        GpartError: a layer was already repacked (the base ran in eval mode before GPart was applied).
    """
    changed = 0
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit" or not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise GpartError(f"the 4-bit layer {name!r} was repacked by bitsandbytes for CPU inference (the base ran "
                             f"in eval mode before GPart was applied); that layout drops gradients. Load the base "
                             f"again and apply GPart before running it")
        module.support_avx512bf16_for_cpu = False  # the switch bitsandbytes checks before repacking
        changed += 1
    return changed
