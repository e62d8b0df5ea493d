"""`gpart train`: one call from a recipe to a finished run dir, with a before/after summary."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from rich.console import Console

from ..core.model import compute_path
from ..recipe.schema import Recipe
from . import distributed, run_dir
from .checkpoint import checkpoint_step
from .dry_run import dry_run as dry_run_report
from .interrupt import Interrupted
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
    trainer = Trainer(recipe, out, console, resume=resume, device=device)  # checks device and trackers first
    if dry_run:
        try:
            if trainer.main:
                dry_run_report(recipe, console, f"device {trainer.device} · output {out}")
            return None
        finally:
            distributed.shutdown()
    ok = False
    try:
        with trainer.stops:  # Ctrl-C and SIGTERM: see `interrupt`
            plan = shared_plan(out, recipe, resume, overwrite)
            trainer.resume = plan.resume
            results = _run(trainer, recipe, out, plan, console)
        ok = True
        return results
    except KeyboardInterrupt:
        trainer.tracking.close("KILLED")
        raise _interrupted(trainer, recipe, out, console) from None
    except BaseException:
        trainer.tracking.close("FAILED")
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


def _run(trainer: Trainer, recipe: Recipe, out: Path, plan: run_dir.RunDirPlan, console: Console) -> dict | None:
    trainer.setup()
    splits = trainer.s.splits
    parallel = f" × {trainer.world} processes ({recipe.train.distributed})" if trainer.world > 1 else ""
    if trainer.main:
        console.print(f"[bold]{recipe.name}[/]: {recipe.method.name} on {trainer.s.task['name']} · "
                      f"{len(splits.train):,} train / {len(splits.dev) if splits.dev else 0:,} dev rows · "
                      f"{trainer.total_steps:,} steps · device {trainer.device}{parallel} · weights "
                      f"{recipe.model.dtype}{' · bf16 autocast' if trainer.autocast_dtype else ''} · output {out}")
    # Only now that data, model and method have loaded does the run dir change (see run_dir).
    if trainer.main:
        if plan.note:
            console.print(plan.note)
        run_dir.begin(plan, recipe)
    distributed.barrier()
    trainer.train()
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


def _interrupted(trainer: Trainer, recipe: Recipe, out: Path, console: Console) -> Interrupted:
    """Say where the interrupted run resumes from (its last checkpoint), with the command that does it."""
    step = trainer.saved_step
    if step is None and trainer.main and run_dir.state_of(out) is run_dir.DirState.RESUMABLE:
        step = checkpoint_step(out / "checkpoints" / "last")  # stopped before a --resume had restored it
    stopped = Interrupted(trainer.stops.signum or signal.SIGINT, step, getattr(trainer, "total_steps", None))
    if not trainer.main:
        return stopped
    # The run dir's recipe.yaml is the resolved one, --set overrides included.
    command = f"gpart train {out / 'recipe.yaml'} --output {out}"
    if step is not None:
        of = "" if stopped.total is None else f"/{stopped.total}"
        console.print(f"\n[yellow]interrupted[/]: checkpoint at step {step}{of}. Resume with:\n  {command} --resume",
                      soft_wrap=True)
    elif (out / "recipe.yaml").is_file():
        again = " --overwrite" if run_dir.state_of(out) is run_dir.DirState.ENDED else ""
        console.print(f"\n[yellow]interrupted[/] before the first checkpoint: nothing to resume. Start again with:\n"
                      f"  {command}{again}", soft_wrap=True)
    else:
        console.print("\n[yellow]interrupted[/] before training started: nothing was written", soft_wrap=True)
    return stopped
