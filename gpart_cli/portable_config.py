"""A merged model's config.json that every reader understands, not only the transformers that wrote it.

transformers 5 writes RoPE settings as `rope_parameters` ({"rope_theta", "rope_type", ...}, or one such dict per
attention layer type) and the weights' dtype as `dtype`. transformers 4.x and vLLM builds that bundle it read the
older top-level `rope_theta`, `rope_scaling` and `torch_dtype`; missing, they silently fall back to a RoPE base of
10,000 (Qwen2.5 needs 1,000,000) and the model loads but is quietly wrong. `make_portable` adds those keys, derived
from what the new format holds, next to it; readers of either generation find what they expect.
"""

from __future__ import annotations

_GLOBAL_LAYER = "full_attention"     # transformers 4.x's top-level RoPE is the global-attention one (Gemma 2/3)
_LOCAL_LAYER = "sliding_attention"   # transformers 4.x Gemma 3 names its base `rope_local_base_freq`
# Nested configs whose transformers 5 loader folds a top-level `rope_scaling` back into the global layers only; the
# generic loader would replace the whole nested dict with it, so other nested configs get no `rope_scaling`.
_NESTED_SCALING_READERS = ("gemma3",)


def _split_rope(rope: dict) -> tuple[dict | None, dict | None, bool]:
    """(global, local, nested) RoPE dicts of `rope_parameters`, flat or nested by attention layer type."""
    if "rope_theta" in rope or "rope_type" in rope:
        return rope, None, False
    nested = {k: v for k, v in rope.items() if isinstance(v, dict)}
    if not nested:
        return None, None, True
    return nested.get(_GLOBAL_LAYER) or next(iter(nested.values())), nested.get(_LOCAL_LAYER), True


def legacy_rope_fields(config: dict) -> dict:
    """The transformers 4.x RoPE keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`) for `config`."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    global_rope, local_rope, nested = _split_rope(rope)
    scaling_ok = not nested or str(config.get("model_type", "")).startswith(_NESTED_SCALING_READERS)
    fields: dict = {}
    if global_rope and global_rope.get("rope_theta") is not None:
        fields["rope_theta"] = global_rope["rope_theta"]
        kind = global_rope.get("rope_type", global_rope.get("type", "default"))
        if kind != "default" and scaling_ok:  # 4.x keeps scaling apart from the base; readers use "type" or "rope_type"
            scaling = {k: v for k, v in global_rope.items() if k != "rope_theta"}
            fields["rope_scaling"] = {**scaling, "rope_type": kind, "type": kind}
    if local_rope and local_rope.get("rope_theta") is not None:
        fields["rope_local_base_freq"] = local_rope["rope_theta"]
    return fields


def make_portable(config: dict, dtype: str) -> dict:
    """`config` plus the legacy keys it lacks: RoPE at top level and `torch_dtype`. Keys already present are kept."""
    out = dict(config)
    for key, value in legacy_rope_fields(config).items():
        if out.get(key) is None:
            out[key] = value
    out.setdefault("torch_dtype", out.get("dtype") or dtype)
    return out
