"""Rollouts on a GPU with vLLM (docs/gpu.md): push the current merged weights into the running engine.

vLLM generates from its own copy of the base. Before each rollout TRL's `VLLMGeneration.sync_weights` walks the
policy's parameters and loads them into the engine; for a GPart model that walk would send θ and every
`base_layer.weight` under names vLLM does not know. Only the adapted modules change, so only they are sent: each as
W0 + Pθ (fp32 sum, rounded once into the base dtype, exactly what `gpart.merge` writes), cast to the engine's dtype,
under the name it has in the base checkpoint, built one layer at a time. The GPU holds one merged layer beyond the
training model, never a second copy of the base.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..core.model import gpart_layers


def merged_weights(model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, W0 + Pθ) for every adapted weight (and adapted bias) of `model`, one layer at a time.

    Names are the base model's (`model.layers.0.self_attn.q_proj.weight`), values those `gpart.merge` writes, cast to
    `dtype` (default: the base weight's).
    """
    for name, layer in gpart_layers(model):
        with torch.no_grad():
            weight, bias = layer.merged_weights()
        yield f"{name}.weight", weight if dtype is None else weight.to(dtype)
        del weight
        if layer.adapt_bias:
            yield f"{name}.bias", bias if dtype is None else bias.to(dtype)


def engine_dtype(generation) -> torch.dtype | None:
    """The dtype of the colocated vLLM engine's weights (None in server mode: the server casts what it receives)."""
    llm = getattr(generation, "llm", None)
    return getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "dtype", None)


def push_merged_weights(generation, model) -> None:
    """Make TRL's `VLLMGeneration` sync only the merged adapted weights of GPart `model` (see the module doc)."""
    generation._iter_named_params = lambda: merged_weights(model, engine_dtype(generation))
