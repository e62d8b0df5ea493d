"""GPart in Hugging Face `transformers.Trainer` and TRL's trainers (docs/trainers.md).

A model from `gpart.apply` already trains in any `Trainer`: θ (and the head) are its only trainable parameters. What
the Trainer gets wrong is the saving: it writes the whole model, base included, and resumes by loading that. The
mixin here changes only the three places that touch model weights on disk: a checkpoint and `save_model()` write the
`.gpart` adapter (θ, head, the partition and base fingerprint) instead of the base, and resuming or loading the best
checkpoint copies θ and the head back from it. Optimizer, scheduler, RNG and trainer state stay the Trainer's own, so
`resume_from_checkpoint` continues exactly like an uninterrupted run. Models without GPart (a PEFT method in the same
harness) pass through to the Trainer's own saving.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from ..adapters.loading import task_type_of
from ..core.artifact import base_model_info, save
from ..core.model import STATE_NAME, state_of
from ..core.swap import swap
from ..errors import GpartError

ADAPTER = "adapter.gpart"  # the file a checkpoint or save_model() dir holds


def task_of(model) -> dict:
    """The artifact's task record for a transformers model, from its class (what `gpart eval` loads it as)."""
    task_type = task_type_of(type(model).__name__)
    task = {"type": task_type}
    if task_type != "causal_lm" and getattr(getattr(model, "config", None), "num_labels", None):
        task["num_labels"] = model.config.num_labels
    return task


def has_gpart(model) -> bool:
    return hasattr(model, STATE_NAME)


class GPartTrainerMixin:
    """Put before a `transformers.Trainer` subclass (`gpart.trainer(SFTTrainer)` does it for you)."""

    gpart_recipe: dict | None = None  # stored in the adapter when set (`gpart train` sets it)
    gpart_task: dict | None = None    # default: `task_of(model)`

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if has_gpart(self.model) and getattr(self.args, "gradient_checkpointing", False):
            # Reentrant checkpointing (transformers 4.x's default) drops the gradient of a segment whose inputs do
            # not require one, and with a frozen base none do: make the embeddings' output require it.
            self.model.enable_input_require_grads()

    def _gpart_model(self):
        return self.accelerator.unwrap_model(self.model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._gpart_model()
        if not has_gpart(model):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        base = base_model_info(model, state_of(model).targets)
        save(model, out / ADAPTER, task=self.gpart_task or task_of(model), recipe=self.gpart_recipe, base_model=base)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self._gpart_model()
        if not has_gpart(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        swap(model, _adapter_in(resume_from_checkpoint))
        return None

    def _load_best_model(self) -> None:
        if not has_gpart(self._gpart_model()):
            return super()._load_best_model()
        swap(self._gpart_model(), _adapter_in(self.state.best_model_checkpoint))
        return None


def _adapter_in(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint) / ADAPTER
    if not path.is_file():
        raise GpartError(f"checkpoint {checkpoint} holds no {ADAPTER}: it was not written by a GPart trainer. "
                         f"Resume from a checkpoint of this run (output_dir/checkpoint-N)")
    return path


@lru_cache(maxsize=None)
def trainer(base=None):
    """`base` (default `transformers.Trainer`; TRL's `SFTTrainer`, `GRPOTrainer`, ...) with GPart's saving mixed in.

    Args:
        base: a `transformers.Trainer` subclass.

    Returns:
        A subclass whose checkpoints and `save_model()` dirs hold `adapter.gpart` and the optimizer state, not the
        base, and whose `train(resume_from_checkpoint=...)` restores θ and the head from them.
    """
    if base is None:
        from transformers import Trainer as base
    return type(f"GPart{base.__name__}", (GPartTrainerMixin, base), {"__module__": __name__})
