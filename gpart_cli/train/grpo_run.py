"""`gpart train` with `rl.objective: grpo`: a recipe into a run dir through TRL's GRPO (docs/rl.md).

Prompts are the train split of the math task named by `data.task` (GSM8K, MATH, MAWPS), rendered as `gpart eval`
renders them; the reward is the eval task's own scorer (`evaluation.rewards`). The run dir holds what an SFT run's
does: recipe.yaml, metrics.jsonl (one line per step: reward, its spread, KL, loss, ...), checkpoints/ (last ->
checkpoint-N: adapter + optimizer state), the adapter, results.json with the held-out scores before vs after and
the reward of the first vs the last quarter of the steps, predictions.jsonl, and reward.png, the reward curve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from rich.console import Console

from .. import atomic
from ..adapters.devices import autocast_dtype, resolve_device
from ..adapters.loading import load_model, load_tokenizer
from ..core.model import merged_for_decoding
from ..data.chat import resolve_rendering
from ..errors import GpartError
from ..evaluation.generate import MATH_STOPS
from ..evaluation.rewards import check_scorer, correctness, readable_answer
from ..evaluation.tasks import GENERATION_TASKS, load_task_rows, prompts_for, run_generation
from ..recipe.methods import method, prepare, save_result, trainable_count
from ..recipe.schema import Recipe
from . import run_dir
from .hf_callbacks import LinkLast, MetricsLog, RichProgress
from .progress import summary_table
from .setup import model_source

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}  # recipe -> transformers


def check(recipe: Recipe) -> None:
    """What GRPO needs of the rest of the recipe, each refusal naming the field and the fix."""
    d, m = recipe.data, recipe.method
    if d.family != "sft":
        raise GpartError(f"rl.objective grpo trains a causal LM: set data.family: sft (got {d.family})")
    if d.task not in GENERATION_TASKS:
        raise GpartError(f"rl.objective grpo takes its prompts and rewards from a math task: set data.task to one of "
                         f"{', '.join(GENERATION_TASKS)} (got {d.task})")
    if method(m.name).result == "model":
        raise GpartError(f"rl.objective grpo trains an adapter; method {m.name} has none. Use method gpart, unilora "
                         f"or lora")
    if m.name == "gpart" and m.dropout:
        raise GpartError("rl.objective grpo scores old and new policies on the same tokens, which ΔW dropout would "
                         "make differ; set method.dropout: 0")
    check_scorer(d.task, recipe.rl.reward)


def _trl():
    try:
        from trl import GRPOConfig

        from .grpo import GPartGRPOTrainer
    except ImportError as e:
        raise GpartError(f"rl.objective grpo needs TRL ({e}); install it with: pip install 'gpart[rl]'") from None
    return GRPOConfig, GPartGRPOTrainer


def _config(GRPOConfig, recipe: Recipe, out: Path, steps: int, device: torch.device):
    t, rl = recipe.train, recipe.rl
    return GRPOConfig(
        output_dir=str(out / "checkpoints"), max_steps=steps, per_device_train_batch_size=t.batch_size * rl.group_size,
        gradient_accumulation_steps=t.grad_accum, num_generations=rl.group_size,
        max_completion_length=rl.max_completion_length, temperature=rl.temperature, beta=rl.kl_weight,
        learning_rate=t.lr_theta, weight_decay=t.weight_decay, warmup_steps=math.ceil(t.warmup_ratio * steps),
        lr_scheduler_type=SCHEDULES[t.schedule], max_grad_norm=t.max_grad_norm or 0.0, seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing, bf16=autocast_dtype(t.precision, device) is not None,
        use_cpu=device.type == "cpu", logging_steps=1, save_strategy="steps",
        save_steps=t.save_every or t.eval_every or steps, save_total_limit=1, report_to=t.report_to or "none",
        disable_tqdm=True, use_vllm=rl.use_vllm, vllm_mode="colocate",
        vllm_gpu_memory_utilization=rl.vllm_gpu_memory_utilization)


def _rows_and_prompts(recipe: Recipe, tokenizer, rendering):
    d = recipe.data
    rows = load_task_rows(d.task, d.train_files, d.train_split, d.max_train_samples)
    return rows, prompts_for(d.task, rows, rendering, tokenizer)


def _evaluate(recipe: Recipe, model, tokenizer, rendering, console, autocast) -> tuple[dict | None, list[dict]]:
    e = recipe.eval
    if not e.task:
        return None, []
    rows = load_task_rows(e.task, e.files, e.split, e.limit)
    with merged_for_decoding(model):
        return run_generation(e.task, model, tokenizer, rows, e.batch_size, e.max_new_tokens, console, autocast,
                              rendering=rendering)


def reward_summary(path: Path) -> dict:
    """Mean training reward of the first and of the last quarter of the steps (at least one step each)."""
    rewards = [r["reward"] for r in map(json.loads, path.read_text().splitlines()) if "reward" in r]
    if not rewards:
        return {}
    k = max(1, len(rewards) // 4)
    return {"first": sum(rewards[:k]) / k, "last": sum(rewards[-k:]) / k, "steps_each": k}


def plot_rewards(metrics: Path, png: Path, title: str) -> None:
    """reward.png: the mean reward per step, with ± its spread across the step's completions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in map(json.loads, metrics.read_text().splitlines()) if "reward" in r]
    steps = [r["step"] for r in records]
    mean = [r["reward"] for r in records]
    std = [r.get("reward_std", 0.0) for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, mean, marker="o", ms=3, label="mean reward")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                    label="± std over completions")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run(recipe: Recipe, out: Path, *, resume: bool = False, overwrite: bool = False, dry_run: bool = False,
        console: Console | None = None, device: str | None = None) -> dict | None:
    """Train `recipe` with GRPO into `out`; returns results.json's content (None for a dry run)."""
    console = console or Console(stderr=True)
    check(recipe)
    GRPOConfig, GPartGRPOTrainer = _trl()
    out, t, task = Path(out), recipe.train, recipe.data.task
    plan = None if dry_run else run_dir.plan(out, recipe, resume=resume, overwrite=overwrite)
    dev = resolve_device(device)
    torch.manual_seed(t.seed)
    source = model_source(recipe)
    tokenizer = load_tokenizer(source)
    rendering = resolve_rendering(recipe.data, tokenizer)
    rows, prompts = _rows_and_prompts(recipe, tokenizer, rendering)
    steps = t.max_steps or max(1, math.ceil(t.epochs * len(rows) / (t.batch_size * t.grad_accum)))
    console.print(f"[bold]{recipe.name}[/]: GRPO · {recipe.method.name} on {task} · {len(rows):,} prompts · "
                  f"{steps:,} steps × {t.batch_size * t.grad_accum} prompts × {recipe.rl.group_size} completions · "
                  f"device {dev} · output {out}")
    if plan is None:
        return None
    model = _plain_floats(load_model(source, "causal_lm", device=dev))
    model = prepare(model, recipe.method, t, "causal_lm").model.to(dev)
    if plan.note:
        console.print(plan.note)
    run_dir.begin(plan, recipe)
    autocast = autocast_dtype(t.precision, dev)
    before_file = out / "checkpoints" / "before.json"  # the before-scores, kept for a resumed run's results.json
    if plan.resume:
        before = _read_json(before_file)
    else:
        before = _evaluate(recipe, model, tokenizer, rendering, console, autocast)[0] if t.eval_before else None
        before_file.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(before_file, json.dumps(before))
    trainer = _trainer(GPartGRPOTrainer, GRPOConfig, recipe, out, model, tokenizer, rendering, rows, prompts, steps,
                       dev, console)
    if plan.resume:
        run_dir.truncate_metrics(out, _checkpoint_step(out))
        console.print(f"resuming {out} at step {_checkpoint_step(out)}/{steps}")
    trainer.train(resume_from_checkpoint=str(out / "checkpoints" / "last") if plan.resume else None)
    return _finish(recipe, out, trainer, model, tokenizer, rendering, console, autocast, before, steps)


def _trainer(GPartGRPOTrainer, GRPOConfig, recipe: Recipe, out: Path, model, tokenizer, rendering, rows, prompts,
             steps: int, dev: torch.device, console: Console):
    """TRL's GRPO trainer with GPart's θ: the task's rewards, the prompts, gpart's logs, progress and checkpoint link."""
    from datasets import Dataset

    task = recipe.data.task
    stops = rendering.stops(tokenizer, MATH_STOPS)
    rewards = [correctness(task, recipe.rl.reward, rows, stops)]
    if recipe.rl.format_reward:
        rewards.append(readable_answer(task, stops))
    config = _config(GRPOConfig, recipe, out, steps, dev)
    config.reward_weights = [1.0, recipe.rl.format_reward][:len(rewards)]
    trainer = GPartGRPOTrainer(model=model, reward_funcs=rewards, args=config, processing_class=tokenizer,
                               train_dataset=Dataset.from_dict({"prompt": prompts, "row": list(range(len(rows)))}),
                               callbacks=[MetricsLog(out / "metrics.jsonl"), RichProgress(console),
                                          LinkLast(out / "checkpoints")])
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the Rich bar and metrics.jsonl replace its printed dicts
    trainer.gpart_recipe = recipe.to_dict()  # checkpoints' adapters carry it, as gpart train's do
    trainer.gpart_task = {"type": "causal_lm", "name": f"sft/{task}", "num_labels": None, "labels": None,
                          "template": rendering.fingerprint(tokenizer)}  # gpart eval checks the prompts against it
    return trainer


def _finish(recipe, out, trainer, model, tokenizer, rendering, console, autocast, before,
            steps) -> dict:
    path = save_result(model, recipe.method.name, out, task=trainer.gpart_task, recipe=recipe.to_dict(),
                       tokenizer=tokenizer)
    after, records = _evaluate(recipe, model, tokenizer, rendering, console, autocast)
    atomic.write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    reward = reward_summary(out / "metrics.jsonl")
    plot_rewards(out / "metrics.jsonl", out / "reward.png", f"GRPO · {recipe.method.name} · {recipe.data.task}")
    results = {"method": recipe.method.name, "objective": "grpo", "task": f"sft/{recipe.data.task}",
               "result": str(path), "trainable_params": trainable_count(model), "steps": steps, "reward": reward,
               "before": before, "after": after}
    atomic.write_text(out / "results.json", json.dumps(results, indent=2))
    if after is not None or before is not None:
        console.print(summary_table(results))
    if reward:
        console.print(f"mean reward: first {reward['steps_each']} steps {reward['first']:.3f} -> last "
                      f"{reward['steps_each']} {reward['last']:.3f}")
    console.print(f"result: [bold]{path}[/] · metrics {out / 'metrics.jsonl'} · reward curve {out / 'reward.png'} · "
                  f"scores {out / 'results.json'}")
    return results


def _plain_floats(model):
    """A GGUF base dequantized at load still carries transformers' quantizer marker, which makes the Trainer refuse
    to train it; its weights are plain floats, so the marker goes."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and str(getattr(model, "quantization_method", "")).lower().endswith("gguf"):
        quantizer.remove_quantization_config(model)
    return model


def _checkpoint_step(out: Path) -> int:
    state = _read_json(out / "checkpoints" / "last" / "trainer_state.json") or {}
    return int(state.get("global_step", 0))


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None
