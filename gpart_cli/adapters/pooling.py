"""Sentence pooling for classification on encoders (`model.pooling: cls | mean`).

`cls` keeps the model's own head input (BERT: the [CLS] pooler, dense + tanh). `mean` feeds the classifier the
mean of the final hidden states over the real (unpadded) tokens, as sentence encoders such as all-MiniLM-L6-v2
were trained to be used; a linear probe on an untrained [CLS] pooler is not a fair baseline for them.

The pooler module is swapped for `MaskedMeanPooler`, which keeps the original's children (so state-dict keys,
and therefore saving and loading, are unchanged) but does not use them. The attention mask reaches it through
a forward pre-hook on the encoder. `config.gpart_pooling` records the choice, so gpart re-applies it when it
loads a saved model; plain transformers ignores that field and pools with [CLS].
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import GpartError

POOLINGS = ("cls", "mean")
CONFIG_KEY = "gpart_pooling"


class MaskedMeanPooler(nn.Module):
    """Mean of the hidden states over the tokens whose attention mask is 1: (B, T, C) -> (B, C)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for name, child in original.named_children():  # kept only so the checkpoint keys stay the same
            self.add_module(name, child)
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(dim=1)
        weights = self.mask.to(hidden_states.dtype).unsqueeze(-1)        # (B, T, 1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _remember_mask(pooler: MaskedMeanPooler):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        pooler.mask = args[1] if mask is None and len(args) > 1 else mask
    return hook


def apply_pooling(model: nn.Module, pooling: str | None) -> nn.Module:
    """Switch a sequence-classification model to `pooling` in place and record it in its config.

    Raises:
        GpartError: an unknown pooling, or `mean` on a model whose head does not read a pooler.
    """
    pooling = pooling or "cls"
    if pooling not in POOLINGS:
        raise GpartError(f"model.pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    if pooling == "cls":
        return model
    encoder = getattr(model, "base_model", model)
    pooler = getattr(encoder, "pooler", None)
    if isinstance(pooler, MaskedMeanPooler):
        return model
    if not isinstance(pooler, nn.Module):
        raise GpartError(f"model.pooling: mean needs an encoder whose classifier reads a pooler (BERT-style, e.g. "
                         f"all-MiniLM-L6-v2); {type(model).__name__} has none. Use model.pooling: cls")
    mean = MaskedMeanPooler(pooler)
    encoder.pooler = mean
    encoder.register_forward_pre_hook(_remember_mask(mean), with_kwargs=True)
    setattr(model.config, CONFIG_KEY, "mean")
    return model


def recorded_pooling(model: nn.Module) -> str:
    """The pooling a saved model was trained with (its config's record; `cls` when none)."""
    return getattr(getattr(model, "config", None), CONFIG_KEY, None) or "cls"
