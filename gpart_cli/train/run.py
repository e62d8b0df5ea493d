"""`gpart train`: one call from a recipe to a finished run dir, with a before/after summary."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from ..core.model import compute_path
from ..recipe.schema import Recipe
from . import distributed, run_dir
from .progress import summary_table
from .trainer import Trainer


def default_output(recipe: Recipe) -> Path:
    return Path("runs") / (recipe.name or "run")


def run(recipe: Recipe, out: Path, *, resume: bool = False, overwrite: bool = False, dry_run: bool = False,
        console: Console | None = None, device: str | None = None) -> dict | None:
    """Train the recipe into `out` on `device` (default: cuda when available); returns results.json's content
    (None for a dry run and off rank 0)."""
    console = console or Console(stderr=True)
    if recipe.rl.objective == "grpo":  # RL through TRL's GRPOTrainer (docs/rl.md)
        from .grpo_run import run as run_grpo

        return run_grpo(recipe, out, resume=resume, overwrite=overwrite, dry_run=dry_run, console=console,
                        device=device)
    trainer = Trainer(recipe, out, console, resume=resume, device=device)
    ok = False
    try:
        plan = None if dry_run else shared_plan(out, recipe, resume, overwrite)
        trainer.resume = bool(plan and plan.resume)
        results = _run(trainer, recipe, out, plan, console)
        ok = True
        return results
    except BaseException as e:
        trainer.tracking.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        trainer.release()
        distributed.shutdown(ok)  # on errors too: a process that exits with its process group open aborts


def shared_plan(out: Path, recipe: Recipe, resume: bool, overwrite: bool) -> run_dir.RunDirPlan:
    """Rank 0 reads the run dir and decides (a refusal too) before anything is loaded; every rank gets its decision,
    so nodes need not share the run dir's filesystem."""
    def decide() -> dict[str, bytes]:
        plan = run_dir.plan(out, recipe, resume=resume, overwrite=overwrite)
        return {"plan": json.dumps({"resume": plan.resume, "replace": plan.replace, "note": plan.note}).encode()}

    return run_dir.RunDirPlan(Path(out), **json.loads(distributed.from_rank0(decide, "the run dir")["plan"]))


def _run(trainer: Trainer, recipe: Recipe, out: Path, plan: run_dir.RunDirPlan | None,
         console: Console) -> dict | None:
    trainer.setup()
    splits = trainer.s.splits
    parallel = f" × {trainer.world} processes ({recipe.train.distributed})" if trainer.world > 1 else ""
    if trainer.main:
        console.print(f"[bold]{recipe.name}[/]: {recipe.method.name} on {trainer.s.task['name']} · "
                      f"{len(splits.train):,} train / {len(splits.dev) if splits.dev else 0:,} dev rows · "
                      f"{trainer.total_steps:,} steps · device {trainer.device}{parallel} · weights "
                      f"{recipe.model.dtype}{' · bf16 autocast' if trainer.autocast_dtype else ''} · output {out}")
    if plan is None:
        return None
    # Only now that data, model and method have loaded does the run dir change (see run_dir).
    if trainer.main:
        if plan.note:
            console.print(plan.note)
        run_dir.begin(plan, recipe)
    distributed.barrier()
    try:
        trainer.train()
    except KeyboardInterrupt:
        # The run dir's recipe.yaml is the resolved one, --set overrides included.
        console.print(f"\n[yellow]interrupted[/]: checkpoint saved. Resume with:\n  gpart train "
                      f"{out / 'recipe.yaml'} --output {out} --resume")
        raise
    if not trainer.main and not trainer.all_evaluate:  # rank 0 finishes alone, unless every rank evaluates
        return None
    results = trainer.finish()
    if not trainer.main:
        return None
    console.print(summary_table(results))
    path = compute_path(trainer.model)
    if path:
        console.print(f"GPart compute path: {path}")
    console.print(f"result: [bold]{results['result']}[/] · metrics {out / 'metrics.jsonl'} · "
                  f"scores {out / 'results.json'}")
    return results
