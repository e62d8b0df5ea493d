"""`gpart train --dry-run` (docs/design.md §5.2): what the run would train, without reading the model's weights.

It prints the resolved recipe (--set overrides applied), the data and the number of steps, the trainable parameters
of the method counted on a skeleton of the model (its config only: every weight on the meta device), and for SFT one
training example as rendered, with the part its loss covers marked. Data and tokenizer load as in a run, so a wrong
column or file shows here too; nothing is written.
"""

from __future__ import annotations

import torch
import yaml
from rich.console import Console
from rich.text import Text

from ..data.sft import IGNORE_INDEX
from ..recipe.methods import prepare, trainable_count
from ..recipe.schema import Recipe
from .setup import build
from .trainer import step_counts

LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"  # around the text the loss covers (readable when piped, where colour is lost)


def dry_run(recipe: Recipe, console: Console, where: str = "") -> dict:
    """Print what `recipe` would train (`where`: the device and output, for the summary line); returns {"rows",
    "steps", "trainable", "groups"} (parameter counts)."""
    setup = build(recipe, torch.device("cpu"), weights=False)
    prepared = prepare(setup.model, recipe.method, recipe.train, setup.task_type)
    groups = {g["name"]: sum(p.numel() for p in g["params"]) for g in prepared.groups}
    splits = setup.splits
    steps = step_counts(recipe.train, len(splits.train))[2]
    console.print("resolved recipe:", style="bold")
    console.print(yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip(), markup=False, highlight=False)
    console.print(f"{recipe.method.name} on {setup.task['name']} · {len(splits.train):,} train / "
                  f"{len(splits.dev) if splits.dev else 0:,} dev rows · {steps:,} steps" + (f" · {where}" if where else ""),
                  highlight=False)
    parts = " + ".join(f"{name} {n:,}" for name, n in groups.items())
    console.print(f"trainable parameters: {trainable_count(prepared.model):,} ({parts}), counted on the model's "
                  f"config: no weights were read", highlight=False)
    if recipe.data.family == "sft":
        console.print(rendered_example(splits.train[0], setup.tokenizer, len(splits.train)))
    return {"rows": len(splits.train), "steps": steps, "trainable": trainable_count(prepared.model),
            "groups": groups}


def rendered_example(example: dict, tokenizer, n: int) -> Text:
    """One tokenized training example as text: the tokens outside the loss dim, those in it bold between ⟦ ⟧."""
    ids, labels = list(example["input_ids"]), list(example["labels"])
    counted = sum(label != IGNORE_INDEX for label in labels)
    text = Text(f"training example 1 of {n:,} ({len(ids)} tokens, {counted} in the loss, between "
                f"{LOSS_OPEN} {LOSS_CLOSE}):\n", style="bold")
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            piece = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            if labels[start] == IGNORE_INDEX:
                text.append(piece, style="dim")
            else:
                text.append(f"{LOSS_OPEN}{piece}{LOSS_CLOSE}", style="bold green")
            start = end
    return text
