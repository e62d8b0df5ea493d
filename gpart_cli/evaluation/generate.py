"""Batched greedy generation for the math benchmarks (docs/design.md §7: greedy, batched, left padding, stop strings).

Prompts are sorted by token length so each batch pads little, left-padded so every prompt ends where
generation starts, and decoded back into the caller's order. A batch ends early once every sequence has
emitted eos or a stop string; each output is cut at its first stop string.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

# The next-question markers of the MetaMath template and the end-of-turn texts of common chat tokenizers.
MATH_STOPS = ["\n\n### Instruction", "\n\nBelow is an instruction", "</s>", "<|im_end|>", "<|endoftext|>"]


def cut_at_stop(text: str, stops: Iterable[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (all of it if none occurs)."""
    cut = len(text)
    for stop in stops:
        if stop:
            idx = text.find(stop)
            if 0 <= idx < cut:
                cut = idx
    return text[:cut]


def end_token_ids(model, tokenizer) -> set[int]:
    """Every eos id the tokenizer or the model's generation config knows (some models list several)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return {int(i) for i in ids if i is not None}


def _stopping_criteria(tokenizer, prompt_width: int, eos_ids: set[int], stops: Sequence[str]):
    """A StoppingCriteria marking each sequence done once it has emitted eos or a stop string.

    generate() keeps a row finished once it is, so each step only looks at what that step added: eos as the last
    token, or a stop string completed in the last few tokens. One device-to-host copy per step (the tails of all
    rows at once); none without stop strings, where eos ends rows through the generation config.
    """
    from transformers import StoppingCriteria

    # Only the last few tokens can complete a stop string, so decode a tail, not the whole text, each step.
    # A missed stop only delays the end of a batch: the final text is cut on the full decode.
    window = max((len(s) for s in stops), default=0) + 4

    class _StopOnTextOrEos(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            rows = input_ids.shape[0]
            if not stops or input_ids.shape[1] <= prompt_width:
                return torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
            tails = input_ids[:, max(prompt_width, input_ids.shape[1] - window):].tolist()
            texts = tokenizer.batch_decode(tails, skip_special_tokens=False)
            done = [tail[-1] in eos_ids or any(s in text for s in stops) for tail, text in zip(tails, texts)]
            # generate() ends the batch once every row is done
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return _StopOnTextOrEos()


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask with padding on the left, so all prompts end at the same column."""
    width = max(len(s) for s in sequences)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.long, device=device))


def model_device(model) -> torch.device:
    """Where the model's inputs go (its first parameter's device for models without `.device`)."""
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def _generate_batch(model, tokenizer, token_ids: list[list[int]], max_new_tokens: int, stops: Sequence[str],
                    pad_id: int, eos_ids: set[int]) -> list[str]:
    """Greedy-decode one left-padded batch; the new text of each row, cut at its first stop string."""
    from transformers import GenerationConfig, StoppingCriteriaList

    input_ids, attention_mask = _left_pad(token_ids, pad_id, model_device(model))
    # A fresh config: greedy regardless of the checkpoint's sampling defaults (temperature, top_p, ...).
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                              eos_token_id=sorted(eos_ids) or None)
    criteria = StoppingCriteriaList([_stopping_criteria(tokenizer, input_ids.shape[1], eos_ids, stops)])
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                            stopping_criteria=criteria)
    new_tokens = output[:, input_ids.shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [cut_at_stop(t, stops) for t in texts]


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             stop: Sequence[str] = (), on_batch: Callable[[int], None] | None = None,
             part: tuple[int, int] = (0, 1)) -> list[str | None]:
    """Greedy completions of `prompts` (new text only, cut at the first stop string), in input order.

    `part` (k, n): decode only batches k, k + n, k + 2n, ... of the single-process batching (None for the other
    prompts), so n data-parallel ranks together decode exactly the batches one process would (`gather_outputs`).
    """
    if not prompts:
        return []
    stops = [s for s in stop if s]
    eos_ids = end_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # left padding is masked by attention_mask, so any id works; eos is the usual choice
        pad_id = min(eos_ids) if eos_ids else 0
    was_training = model.training
    outputs: list[str | None] = [None] * len(prompts)
    try:
        model.eval()
        # Tokenized once, unpadded, and left-padded by `_left_pad`: the tokenizer's padding_side and pad
        # token (possibly missing) are never touched.
        encoded = tokenizer(list(prompts))["input_ids"]
        # Longest first: similar lengths share a batch, and an out-of-memory shows on the first batch.
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        with torch.inference_mode():
            for start in range(part[0] * batch_size, len(order), part[1] * batch_size):
                batch = order[start:start + batch_size]
                texts = _generate_batch(model, tokenizer, [encoded[i] for i in batch], max_new_tokens, stops,
                                        pad_id, eos_ids)
                for i, text in zip(batch, texts):
                    outputs[i] = text
                if on_batch is not None:
                    on_batch(start + len(batch))
    finally:
        model.train(was_training)
    return outputs


def gather_outputs(outputs: list[str | None]) -> list[str]:
    """Every rank's share of `generate(part=...)` outputs, merged in input order on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return outputs
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, {i: text for i, text in enumerate(outputs) if text is not None})
    merged = {i: text for share in shares for i, text in share.items()}
    return [merged[i] for i in range(len(outputs))]
