"""The SFT dev loss without whole-batch logits: the decoder body once, then head + cross-entropy in chunks.

transformers' causal-LM loss builds logits for every position of the batch and upcasts them to fp32: B·T·V·4 bytes,
and about as much again inside the cross-entropy. For Qwen2.5 (V = 152,064) at 32 × 2,048 that is ~40 GB + ~40 GB,
hours into a run. Only response tokens carry a label, so this keeps the final hidden states at labelled positions
(M ≤ B·T rows of width H) and sends them through the output head `chunk` rows at a time: the logits alive at once
are chunk × V, whatever B and T are.

Architectures post-process their head output in different ways (Gemma's soft-capping, Cohere's logit scale, ...).
Before first use on a model, `ChunkedLoss` checks head(body(x)) against the model's own logits on a 16-token probe;
a model it cannot reproduce is scored the plain way (one sequence per forward) with a warning, never wrongly.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024  # labelled tokens per head call: 1024 × 152,064 × 4 B = 0.6 GB of fp32 logits for Qwen2.5
_PROBE_TOKENS = 16


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (LoRA/Uni-LoRA layers are injected in place, so it includes them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _post_process(config, logits: torch.Tensor) -> torch.Tensor:
    """The head post-processing some causal LMs apply after lm_head (all of them are checked by the probe)."""
    scale = getattr(config, "logit_scale", None)          # Cohere: logits * scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)     # Granite: logits / scaling
    if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap · tanh(logits / cap)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is an FSDP2 (`fully_shard`) module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch builds without distributed support
        return False
    return isinstance(model, FSDPModule)


class ChunkedLoss:
    """Summed token cross-entropy of a causal LM at labelled positions, head applied `chunk` rows at a time."""

    def __init__(self, model: torch.nn.Module, chunk: int = DEFAULT_CHUNK) -> None:
        self.model, self.chunk = model, max(1, int(chunk))
        base = _unwrapped(model)
        self.config = getattr(base, "config", None)
        self.head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        self.body = base.get_decoder() if hasattr(base, "get_decoder") else None
        # Decided by the probe on first use. Under FSDP2 calling the body and the head apart would skip the root
        # unit's all-gather (its final norm stays sharded): score one sequence per forward of the whole model.
        self.chunked: bool | None = False if _sharded(model) else None

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _post_process(self.config, self.head(hidden)).float()

    def _probe(self, batch: dict) -> bool:
        """Whether head(body(x)) reproduces the model's own logits (16 tokens of the first row)."""
        if self.head is None or self.body is None or self.body is _unwrapped(self.model):
            return False
        ids = batch["input_ids"][:1, :_PROBE_TOKENS]
        mask = batch.get("attention_mask")
        mask = None if mask is None else mask[:1, :_PROBE_TOKENS]
        try:
            ours = self._logits(self._hidden(ids, mask))
            theirs = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        except (TypeError, AttributeError, ValueError):  # a body with another call signature
            return False
        return ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, int]:
        """(sum of token losses as an fp32 scalar, number of labelled tokens) of one collated batch."""
        if self.chunked is None:
            self.chunked = self._probe(batch)
            if not self.chunked:
                from rich.console import Console

                name = type(_unwrapped(self.model)).__name__
                Console(stderr=True).print(f"[yellow]warning:[/] the dev loss of {name} is computed one sequence per "
                                           f"forward (its output head is not the plain lm_head this chunked path "
                                           f"reproduces); lower eval.dev_batch_size if memory is short")
        if not self.chunked:
            return self._per_sequence(batch)
        labels = batch["labels"][:, 1:]                         # position t predicts token t + 1
        keep = labels != IGNORE_INDEX                            # (B, T-1)
        hidden = self._hidden(batch["input_ids"], batch.get("attention_mask"))[:, :-1][keep]  # (M, H)
        targets = labels[keep]                                   # (M,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], self.chunk):
            logits = self._logits(hidden[start:start + self.chunk])   # (chunk, V) fp32: the only V-wide tensor
            total += F.cross_entropy(logits, targets[start:start + self.chunk], reduction="sum")
        return total, int(targets.numel())

    def _per_sequence(self, batch: dict) -> tuple[torch.Tensor, int]:
        total, count = None, 0
        for row in range(batch["input_ids"].shape[0]):
            one = {k: v[row:row + 1] for k, v in batch.items()}
            n = int((one["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n:
                loss = self.model(**one).loss.float() * n
                total = loss if total is None else total + loss
                count += n
        return (torch.zeros(()) if total is None else total), count


@torch.no_grad()
def mean_dev_loss(model: torch.nn.Module, batches: Iterable[dict], autocast: torch.dtype | None = None,
                  chunk: int = DEFAULT_CHUNK) -> float:
    """Mean token cross-entropy over `batches` (dicts of tensors already on the model's device)."""
    was_training = model.training
    model.eval()
    loss_fn = ChunkedLoss(model, chunk)
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            device = batch["input_ids"].device
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss, n = loss_fn(batch)
            total, tokens = total + float(loss), tokens + n
    finally:
        model.train(was_training)
    return total / max(tokens, 1)
