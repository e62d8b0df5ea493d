"""The prompt rendering `gpart eval` uses for generation: the one the run trained with, checked against its record.

A run stores `task.template` = {name, sha256} (`data.chat.Rendering.fingerprint`). Evaluation renders the same way
from the run's recipe with the tokenizer it loads; a different hash means the prompts differ from training's (another
tokenizer or chat template), and the scores may not measure what was trained, so gpart says so.
"""

from __future__ import annotations

import dataclasses

from rich.console import Console

from ..adapters.reference import AdapterRef
from ..data.chat import Rendering, default_rendering, resolve_rendering


def _sft_data(recipe: dict | None):
    """The recipe's data section as a `DataSection` when it is an SFT recipe, else None."""
    from ..recipe.schema import DataSection

    recorded = dict((recipe or {}).get("data") or {})
    if recorded.get("family") != "sft":
        return None
    fields = {f.name for f in dataclasses.fields(DataSection)}
    return DataSection(**{k: v for k, v in recorded.items() if k in fields})


def eval_rendering(ref: AdapterRef | None, tokenizer, console: Console | None = None) -> Rendering:
    """The run's rendering (MetaMath's prompt without an SFT recipe); a warning when it no longer hashes the same."""
    data = _sft_data(ref.recipe if ref else None)
    rendering = default_rendering() if data is None else resolve_rendering(data, tokenizer)
    recorded = ref.task.get("template") if ref else None
    if recorded:
        now = rendering.fingerprint(tokenizer)
        if now != recorded:
            (console or Console(stderr=True)).print(
                f"[yellow]warning:[/] prompt template drift: {ref.given} trained with {recorded.get('name')} "
                f"(sha256 {str(recorded.get('sha256'))[:12]}), this evaluation renders {now['name']} (sha256 "
                f"{now['sha256'][:12]}). The tokenizer or its chat template differs from training's; scores may not "
                f"reflect the adapter. Evaluate with the base the run trained on (--model)", highlight=False,
                soft_wrap=True)
    return rendering
