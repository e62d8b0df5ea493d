"""`gpart merge --check`: how far the merged model's logits are from the unmerged adapter's on a few fixed inputs.

Merging sums W0 + Pθ in fp32 and rounds once into the target dtype; the check measures what that rounding (and the
cast of everything else) does to the outputs: the largest |merged − unmerged| logit over the probe inputs, next to
the largest |logit| for scale. Text models read four fixed sentences through their tokenizer (padded positions left
out), image models a seeded batch of random pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROBE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is 6 times 7? The answer is: 42",
               "A merged model should say what the adapter said.", "Short one."]
_PIXEL_SEED = 0


@dataclass(frozen=True)
class MergeCheck:
    max_abs_diff: float      # largest |merged − unmerged| logit
    max_abs_logit: float     # largest |unmerged| logit, for scale
    inputs: int              # probe inputs compared

    def describe(self) -> str:
        return (f"merge check: largest |merged - unmerged| logit {self.max_abs_diff:.3g} over {self.inputs} inputs "
                f"(largest |logit| {self.max_abs_logit:.3g})")


def probe_inputs(model, tokenizer=None) -> dict:
    """A batch of fixed inputs for `model`: the probe sentences, or seeded random pixels for an image model."""
    config = model.config
    if tokenizer is None and hasattr(config, "image_size"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        g = torch.Generator().manual_seed(_PIXEL_SEED)
        return {"pixel_values": torch.randn(len(PROBE_TEXTS), getattr(config, "num_channels", 3), size, size,
                                            generator=g)}
    if tokenizer is None:
        from .errors import GpartError

        raise GpartError("merge --check needs the base's tokenizer (text) or an image_size in its config (vision); "
                         "this base has neither: merge without --check")
    return dict(tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt"))


@torch.no_grad()
def probe_logits(model, batch: dict) -> torch.Tensor:
    """fp32 logits of `batch`, padded positions (attention_mask 0) set to 0 so they never count."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    finally:
        model.train(was_training)
    mask = batch.get("attention_mask")
    if mask is not None and logits.dim() == 3:  # causal LM: (B, T, V)
        logits = logits * mask[..., None].to(logits.dtype)
    return logits


def compare(before: torch.Tensor, after: torch.Tensor) -> MergeCheck:
    return MergeCheck(max_abs_diff=float((after - before).abs().max()), max_abs_logit=float(before.abs().max()),
                      inputs=before.shape[0])
