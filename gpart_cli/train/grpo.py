"""GRPO with TRL's `GRPOTrainer` as the engine, GPart supplying the trainable θ and the adapter (docs/rl.md).

TRL samples a group of completions per prompt, scores them, turns the rewards into group-relative advantages
(reward minus the group's mean, over the group's std) and takes a clipped policy-gradient step over the completion
tokens, plus β·KL to a reference policy. What is GPart's own is small and lives here:

- the reference policy is the model at its starting θ (zero, or `method.init_from`'s): the KL forward swaps θ in for
  one call instead of loading a second copy of the base from disk, as TRL would for a non-PEFT model;
- sampling on the training model decodes with the merged weights (W_eff built once per rollout, not per token; the
  CPU path's group ids stay cached for the next training step);
- with vLLM, the merged adapted weights are what is pushed into the engine (`vllm_sync`);
- checkpoints and `save_model()` write the `.gpart` adapter (`hf_trainer.GPartTrainerMixin`).

PEFT methods (LoRA, Uni-LoRA) go through the same class untouched: TRL already handles them.
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from ..core.model import merged_for_decoding, state_of
from .hf_trainer import GPartTrainerMixin, has_gpart
from .vllm_sync import push_merged_weights


class ThetaReference:
    """The policy at the θ it started from, callable like the model: TRL's `ref_model` without a second base."""

    def __init__(self, model) -> None:
        self.model = model
        self.theta0 = state_of(model).theta.detach().clone()

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        theta = state_of(self.model).theta
        current = theta.detach().clone()
        theta.copy_(self.theta0)
        try:
            return self.model(*args, **kwargs)
        finally:
            theta.copy_(current)


class GPartGRPOTrainer(GPartTrainerMixin, GRPOTrainer):
    """TRL's `GRPOTrainer` for a model from `gpart.apply` (or a PEFT model, passed through)."""

    def __init__(self, model, reward_funcs=None, args=None, **kwargs) -> None:
        gpart = has_gpart(model)
        beta = args.beta
        if gpart:
            args.beta = 0.0  # TRL would load the base again from model.name_or_path as its reference
        try:
            super().__init__(model, reward_funcs, args, **kwargs)
        finally:
            args.beta = beta
        if gpart:
            self.beta = beta
            self.ref_model = ThetaReference(model) if beta else None
            if self.use_vllm:
                push_merged_weights(self.vllm_generation, model)

    def _generate_single_turn(self, *args, **kwargs):
        if self.use_vllm:
            return super()._generate_single_turn(*args, **kwargs)
        with merged_for_decoding(self.accelerator.unwrap_model(self.model), keep_ids=True):
            return super()._generate_single_turn(*args, **kwargs)
