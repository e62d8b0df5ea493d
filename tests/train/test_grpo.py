"""GRPO through TRL with GPart's θ (docs/rl.md): tests that would catch wrong RL.

Group-relative advantages against a hand computation, the loss over completion tokens only, a reward that moves θ
toward the rewarded answer, and the KL reference being the starting θ.
"""

from __future__ import annotations

import statistics

import pytest
import torch

import gpart_cli as gpart

trl = pytest.importorskip("trl")

CFG = dict(d=96, seed=1, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
PROMPTS = ["Tom has 3 apples and buys 2 more.", "A box holds 4 pens; how many in 2 boxes?"]


def grpo(tiny_llama_dir, tmp_path, rewards, group: int = 4, **config):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpart_cli.train.grpo import GPartGRPOTrainer

    torch.manual_seed(0)
    model = gpart.apply(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), gpart.GPartConfig(**CFG))
    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=len(PROMPTS) * group, num_generations=group,
                          max_completion_length=config.pop("max_completion_length", 6), temperature=1.0,
                          learning_rate=config.pop("learning_rate", 0.05), report_to="none", use_cpu=True,
                          disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0, bf16=False, **config)
    data = Dataset.from_dict({"prompt": PROMPTS, "row": [0, 1]})
    return GPartGRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=data,
                            processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir))


def batch_of(trainer, group: int = 4) -> list[dict]:
    """One generation batch as TRL's sampler forms it: each prompt `group` times in a row."""
    return [{"prompt": p, "row": i} for i, p in enumerate(PROMPTS) for _ in range(group)]


FIXED = [1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0]  # group 0: two right of four; group 1: all the same


def fixed_reward(completions, **_):
    return FIXED[:len(completions)]


def test_advantages_are_group_relative(tiny_llama_dir, tmp_path):
    trainer = grpo(tiny_llama_dir, tmp_path, fixed_reward)
    out = trainer._generate_and_score_completions(batch_of(trainer))
    # By hand: each reward minus its group's mean, over the group's (sample) standard deviation + 1e-4.
    expected = []
    for start in (0, 4):
        group = FIXED[start:start + 4]
        mean, std = statistics.mean(group), statistics.stdev(group)
        expected += [(r - mean) / (std + 1e-4) for r in group]
    assert expected[:4] == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)
    torch.testing.assert_close(out["advantages"], torch.tensor(expected), rtol=1e-5, atol=1e-6)


def completion_logps(model, out) -> torch.Tensor:
    """log p of every completion token given the prompt and the completion so far, by a plain forward."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return logps[:, out["prompt_ids"].shape[1] - 1:]  # the positions that predict completion tokens


def test_loss_covers_completion_tokens_only(tiny_llama_dir, tmp_path):
    trainer = grpo(tiny_llama_dir, tmp_path, fixed_reward)
    model, theta = trainer.model, gpart.theta(trainer.model)
    out = trainer._generate_and_score_completions(batch_of(trainer))
    # Advantages that do not sum to zero per group, so that prompt tokens (the same in a group) would not cancel.
    out["advantages"] = torch.tensor([1.0, -0.5, 0.25, 0.0, 0.75, -1.0, 0.5, 2.0])
    m = out["completion_mask"].float()
    assert out["prompt_mask"].sum() > 0 and m.sum() > 0
    trainer.compute_loss(model, out).backward()
    got = theta.grad.clone()
    theta.grad = None
    # On-policy (ratio 1, nothing clipped) the loss's gradient is -Σ A_i ∇log p(completion tokens) / #tokens.
    (-(out["advantages"][:, None] * completion_logps(model, out) * m).sum() / m.sum()).backward()
    torch.testing.assert_close(got, theta.grad, rtol=1e-4, atol=1e-7)
    # The same sum with the prompt's tokens counted too has another gradient: the check above can tell.
    theta.grad = None
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    full = torch.cat([out["prompt_mask"], out["completion_mask"]], 1).float()
    logits = model(input_ids=ids, attention_mask=full.long()).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    (-(out["advantages"][:, None] * logps * full[:, 1:]).sum() / m.sum()).backward()
    assert (got - theta.grad).abs().max() > 100 * (got.abs().max() * 1e-4 + 1e-7)


def first_token_logp(model, tokenizer, prompt: str, tokens: list[int]) -> float:
    """log P(the first completion token is one of `tokens` | prompt)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    return torch.logsumexp(logp[tokens], 0).item()


def test_a_reward_on_the_answer_raises_its_log_probability(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    # The toy task: a one-token answer, right when it lies on one side of the output embedding's main direction
    # (half the vocabulary, so every group has a signal, and one the adapted layers can reach).
    trainer = grpo(tiny_llama_dir, tmp_path, lambda completion_ids, **_: [float(ids[0] in right) for ids in
                                                                          completion_ids],
                   group=8, max_completion_length=1, max_steps=8, learning_rate=0.2)
    model = trainer.model
    w = model.lm_head.weight.detach()
    side = w @ torch.linalg.svd(w, full_matrices=False).Vh[0]
    right = set((side > 0).nonzero()[:, 0].tolist())
    before = [first_token_logp(model, tokenizer, p, sorted(right)) for p in PROMPTS]
    trainer.train()
    after = [first_token_logp(model, tokenizer, p, sorted(right)) for p in PROMPTS]
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    assert len(rewards) == 8 and all(0 < r < 1 for r in rewards[:1])  # the first groups had a signal
    # log P(right answer) rose for both prompts, by a margin far above float noise.
    assert all(a > b + 0.05 for a, b in zip(after, before)), (before, after)


def test_the_kl_reference_is_the_starting_theta(tiny_llama_dir, tmp_path):
    from gpart_cli.train.grpo import ThetaReference

    trainer = grpo(tiny_llama_dir, tmp_path, fixed_reward, beta=0.1)
    assert isinstance(trainer.ref_model, ThetaReference) and trainer.beta == 0.1 and trainer.args.beta == 0.1
    model, theta = trainer.model, gpart.theta(trainer.model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        theta.add_(0.5)
        moved = model(input_ids=ids).logits
        reference = trainer.ref_model(input_ids=ids).logits
    assert torch.equal(reference, base) and not torch.allclose(moved, base)
    assert torch.equal(theta, torch.full_like(theta, 0.5))  # put back after the reference call
    trainer.args.max_steps = 1
    trainer.train()
    assert "kl" in trainer.state.log_history[0]  # the KL term enters the step's loss and its log
