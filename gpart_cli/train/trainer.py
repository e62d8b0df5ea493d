"""The training loop (docs/design.md §5-6): setup, (resume), evaluate before, train, pick best, save, evaluate.

Data order is a pure function of (seed, epoch): micro-batch m of the run is batch m % B of the permutation
of epoch m // B. Together with the checkpointed optimizer, scheduler and RNG state this makes `--resume`
continue exactly where the run stopped.

Run dir: recipe.yaml (resolved), metrics.jsonl, checkpoints/{last,best}/, the result (adapter.gpart, adapter/
or model/), results.json and predictions.jsonl; `run_dir` decides what may be done with an existing one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console

from .. import atomic
from ..adapters.devices import autocast_dtype, resolve_device
from ..core.model import set_dropout_key
from ..errors import GpartError
from ..evaluation import classify
from ..recipe.methods import prepare, save_result, trainable_count
from ..recipe.schema import Recipe
from . import cpu_alloc, distributed, run_dir, sharding, tracking
from .checkpoint import device_rng_state, load_trainable_state, read_checkpoint, restore_checkpoint, save_checkpoint
from .determinism import configure as configure_determinism
from .dev_loss import mean_dev_loss
from .interrupt import StopSignals
from .progress import TrainProgress
from .setup import Setup, build


def dev_score(recipe: Recipe, metrics: dict) -> float:
    """A dev evaluation as one number, higher is better: the task's main metric, or minus the loss for SFT.
    It picks the best checkpoint of a run, and (`gpart sweep-d`) the best learning rate of a grid cell."""
    if recipe.data.family == "sft":
        return -metrics["loss"]
    return metrics[classify.main_metric(recipe.data.family, recipe.data.task)]


def step_counts(train, rows: int) -> tuple[int, int, int]:
    """(micro-batches per epoch, optimizer steps per epoch, steps of the run) for `rows` training rows."""
    batches = math.ceil(rows / train.batch_size)
    total = train.max_steps or max(1, math.ceil(train.epochs * batches / train.grad_accum))
    return batches, max(1, math.ceil(batches / train.grad_accum)), total


class Trainer:
    """One training run of a recipe into an output directory."""

    def __init__(self, recipe: Recipe, out: Path, console: Console | None = None, resume: bool = False,
                 device: str | None = None) -> None:
        self.recipe, self.out, self.resume = recipe, Path(out), resume
        self.console = console or Console(stderr=True)
        self.rank, self.world = distributed.world()
        self.main = self.rank == 0
        self.fsdp = self.world > 1 and recipe.train.distributed == "fsdp"  # every forward is collective
        # Whether every rank takes part in the before/after evaluation: under FSDP (forwards are collective) and for
        # a generation eval under DDP (each rank decodes its share of the prompts); else rank 0 evaluates alone.
        self.all_evaluate = self.fsdp or (self.world > 1 and recipe.data.family == "sft" and bool(recipe.eval.task))
        # Under torchrun each rank owns its local GPU; alone, --device decides (default: cuda when available).
        self.device = distributed.local_device() if self.world > 1 else resolve_device(device)
        if self.world > 1 and device not in (None, "auto") and resolve_device(device).type != self.device.type:
            raise GpartError(f"--device {device}: under torchrun each process uses its local device "
                             f"({self.device.type}); drop --device")
        self.autocast_dtype = autocast_dtype(recipe.train.precision, self.device)
        if self.fsdp:
            from .fsdp import check_torch

            check_torch()  # before anything is loaded
        tracking.check(recipe.train.report_to)
        self.tracking = tracking.Tracking()  # opened by train() on rank 0
        # Ctrl-C / SIGTERM while steps run stop the loop at the next step boundary (`interrupt`); `run` installs them.
        self.stops = StopSignals(self._stop_notice)
        self.stop_voted = False   # whether any rank was signalled, agreed on in the step's all-reduce
        self.saved_step: int | None = None  # the step of checkpoints/last: where an interrupted run resumes
        self.running_step = 0

    # ---- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        r, t = self.recipe, self.recipe.train
        configure_determinism(t.deterministic)  # before the model is built: cuBLAS reads its setting once
        if self.device.type == "cpu":
            cpu_alloc.keep_freed_memory()  # no page faults on every step's tensors (see cpu_alloc)
        torch.manual_seed(t.seed)
        # Under FSDP rank 0 loads the checkpoint on the CPU and the other ranks build the model on the meta device;
        # sharding places each rank's slice on its GPU and fills it from rank 0 (`fsdp`). A quantized base is
        # placed at load on every rank (its weights stay whole under FSDP anyway).
        from_rank0 = self.fsdp and r.model.quantization is None
        self.s: Setup = build(r, torch.device("cpu") if from_rank0 else self.device,
                              weights=self.main or not from_rank0)
        if from_rank0:
            from .fsdp import match_rank0

            match_rank0(self.s.model)  # the skeletons take rank 0's dtypes and computed buffers
        prepared = prepare(self.s.model, r.method, t, self.s.task_type)
        quantized = getattr(prepared.model, "hf_quantizer", None) is not None  # placed at load, cannot .to()
        weights = (prepared.model.state_dict() if self.main else {}) if from_rank0 else None
        self.model = prepared.model if quantized or self.fsdp else prepared.model.to(self.device)
        if t.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # DDP under torchrun (evals use self.model); FSDP shards self.model in place.
        if self.fsdp:
            from .fsdp import shard

            self.forward_model = shard(self.model, self.device, r.method.name, weights)
        else:
            self.forward_model = distributed.wrap(self.model, self.device)
        del weights  # rank 0's whole CPU copy of the weights
        self.params = [p for g in prepared.groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(prepared.groups, betas=(0.9, 0.999), eps=1e-8)
        self.batches_per_epoch, self.steps_per_epoch, self.total_steps = step_counts(t, len(self.s.splits.train))
        self.scheduler = self._scheduler()
        self._perm: tuple[int, torch.Tensor] | None = None

    def _scheduler(self):
        from transformers import (
            get_constant_schedule_with_warmup,
            get_cosine_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

        warmup = math.ceil(self.recipe.train.warmup_ratio * self.total_steps)
        kind = self.recipe.train.schedule
        if kind == "constant":
            return get_constant_schedule_with_warmup(self.optimizer, warmup)
        make = get_linear_schedule_with_warmup if kind == "linear" else get_cosine_schedule_with_warmup
        return make(self.optimizer, warmup, self.total_steps)

    # ---- data ----------------------------------------------------------------------------------------
    def micro_batch_rows(self, m: int) -> list[int]:
        """The rows of micro-batch `m` of the run: deterministic in (seed, epoch), independent of history."""
        t, data = self.recipe.train, self.s.splits.train
        epoch, k = divmod(m, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(t.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(data), generator=g))
            if hasattr(data, "set_epoch"):  # augmentation draws are a function of (seed, epoch, row) too
                data.set_epoch(epoch)
        return self._perm[1][k * t.batch_size:(k + 1) * t.batch_size].tolist()

    def step_batches(self, step: int):
        """This rank's batches of `step` as (global micro-batch index, batch, weight of its mean loss: 1.0 in a
        single process)."""
        t, data = self.recipe.train, self.s.splits.train
        units = lambda i: sharding.loss_units(data[i], self.recipe.data.family)  # noqa: E731
        for piece in sharding.step_plan(self.rank, self.world, t.grad_accum):
            rows, weight = sharding.share(self.micro_batch_rows(step * t.grad_accum + piece.micro), piece,
                                          self.world, units)
            batch = (self.s.splits.train_collate or self.s.splits.collate)([data[i] for i in rows])
            yield step * t.grad_accum + piece.micro, {key: v.to(self.device) if torch.is_tensor(v) else v
                                                      for key, v in batch.items()}, weight

    # ---- evaluation ----------------------------------------------------------------------------------
    def evaluate_split(self, dataset) -> dict:
        """Metrics on a split: classification metrics, or the mean token loss for SFT."""
        if self.recipe.data.family == "sft":
            return {"loss": self._mean_loss(dataset)}
        preds, refs = classify.predict(self.model, dataset, self.s.splits.collate, self.recipe.eval.batch_size,
                                       self.device, self.autocast_dtype)
        return classify.score(self.recipe.data.family, self.recipe.data.task, preds, refs)

    def evaluate_report(self) -> tuple[dict | None, list[dict]]:
        """Scores and per-example predictions on the reported split (generation tasks for SFT)."""
        e = self.recipe.eval
        if self.recipe.data.family == "sft":
            if not e.task:
                return None, []
            if self.fsdp:  # decoding a sharded model all-gathers every weight for every token
                if self.main:
                    self.console.print(f"generation eval is not run inside an FSDP job; score the result with: "
                                       f"gpart eval --task {e.task} --adapter {self.out} --backend vllm")
                return None, []
            from ..core.model import merged_for_decoding
            from ..data.chat import resolve_rendering
            from ..evaluation.tasks import load_task_rows, run_generation

            rows = load_task_rows(e.task, e.files, e.split, e.limit)
            # Decoded merged (W_eff built once, not per token); training resumes on the unmerged layers.
            with merged_for_decoding(self.model):
                return run_generation(e.task, self.model, self.s.tokenizer, rows, e.batch_size, e.max_new_tokens,
                                      self.console, self.autocast_dtype, part=(self.rank, self.world),
                                      rendering=resolve_rendering(self.recipe.data, self.s.tokenizer))
        if self.s.splits.eval is None:
            return None, []
        preds, refs = classify.predict(self.model, self.s.splits.eval, self.s.splits.collate, e.batch_size,
                                       self.device, self.autocast_dtype)
        records = [{"idx": i, "prediction": p, "reference": r} for i, (p, r) in enumerate(zip(preds, refs))]
        return classify.score(self.recipe.data.family, self.recipe.data.task, preds, refs), records

    def _mean_loss(self, dataset) -> float:
        """Token-mean dev loss, chunked over the vocabulary (`dev_loss`), eval.dev_batch_size rows per forward."""
        size = self.recipe.eval.dev_batch_size or self.recipe.train.batch_size
        batches = ({k: v.to(self.device) for k, v in self.s.splits.collate(
            [dataset[i] for i in range(start, min(len(dataset), start + size))]).items()}
            for start in range(0, len(dataset), size))
        return mean_dev_loss(self.model, batches, self.autocast_dtype)

    # ---- the loop ------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracking.log(record)

    def _train_step(self, step: int) -> tuple[float, float]:
        t = self.recipe.train
        # Summed on the device (float64: Python's float arithmetic): no host sync per micro-batch.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro, batch, weight in self.step_batches(step):
            # ΔW dropout keyed by the global micro-batch: the same masks on resume and on every world size
            set_dropout_key(self.model, t.seed, micro)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = self.forward_model(**batch).loss * weight / t.grad_accum
            loss.backward()
            total += loss.detach()
        # Whether any rank was signalled rides on the loss's all-reduce: every rank stops after the same step.
        summed = torch.stack([total, torch.full_like(total, float(self.stops.requested))])
        distributed.mean_(summed)  # same values on every rank: they stop or skip together
        if self.fsdp:
            distributed.average_gradients(self.params)  # θ and heads are replicated, outside FSDP
        # The norm is taken before the loss is looked at, so that one copy brings both to the host: one sync per
        # step. A non-finite step throws its (clipped) gradients away below.
        norm = torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm or float("inf"))
        total, norm, stop = torch.stack([summed[0], norm.to(total), summed[1]]).tolist()
        self.stop_voted = stop > 0
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            if t.on_nan == "stop":
                self._checkpoint(step)  # the state before this step is still good: keep it
                raise GpartError(f"the loss became {total} at step {step + 1}; stopped with the last good state saved "
                                 f"in {self.out / 'checkpoints' / 'last'}. Lower train.lr_theta / lr_head and start "
                                 f"again, or resume with --set train.on_nan=skip to skip such steps")
            self.console.print(f"[yellow]warning:[/] loss {total} at step {step + 1}: step skipped (train.on_nan: skip)")
            self.scheduler.step()  # keep the schedule aligned with the step count
            return total, float("nan")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm

    def _checkpoint(self, step: int, best: bool = False, gather: bool = True) -> None:
        """Write checkpoints/last (and checkpoints/best) on rank 0. Every rank calls it, unless `gather` is False:
        each rank's device generator state then reaches rank 0 (a collective); without it rank 0 saves its own."""
        own = device_rng_state(self.device)
        states = distributed.gather(own) if gather else {self.rank: own}
        self.saved_step = step
        if not self.main:
            return
        for name in ("best", "last") if best else ("last",):
            save_checkpoint(self.out / "checkpoints" / name, self.model, self.optimizer, self.scheduler, step,
                            self.state, states)

    def _maybe_eval(self, step: int) -> None:
        t = self.recipe.train
        every = t.eval_every or self.steps_per_epoch
        if self.s.splits.dev is None or (step % every and step != self.total_steps):
            if t.save_every and step % t.save_every == 0:
                self._checkpoint(step)
            return
        best = False
        if self.main or self.fsdp:  # rank 0 evaluates and decides (under FSDP every rank evaluates with it)
            metrics = self.evaluate_split(self.s.splits.dev)
            score = dev_score(self.recipe, metrics)
            self._log({"step": step, "dev": metrics})
            if self.state["best_score"] is None or score > self.state["best_score"]:
                self.state.update(best_score=score, best_step=step, best_dev=metrics)
                best = True
        self._checkpoint(step, best)

    def train(self) -> None:
        t = self.recipe.train
        start = 0
        self.state = {"best_score": None, "best_step": None, "best_dev": None, "before": None}
        if self.resume:
            last = self.out / "checkpoints" / "last"
            saved = restore_checkpoint(distributed.from_rank0(lambda: read_checkpoint(last)), last, self.model,
                                       self.optimizer, self.scheduler, self.device, self.rank)
            start, self.state = saved["step"], saved["extra"]
            self.saved_step = start
            if self.main:
                run_dir.truncate_metrics(self.out, start)
                self.console.print(f"resuming {self.out} at step {start}/{self.total_steps}")
        elif t.eval_before and (self.main or self.all_evaluate):
            self.state["before"], _ = self.evaluate_report()
        if self.main:
            self.tracking = tracking.start(t.report_to, self.out, self.recipe.to_dict(),
                                           start if self.resume else None)
            if not self.resume:
                self.tracking.scores(self.state["before"], 0)
        self.model.train()
        samples = t.batch_size * t.grad_accum
        with TrainProgress(self.console, self.total_steps, start, enabled=self.main) as progress, \
                self.stops.deferring():
            for step in range(start, self.total_steps):
                tick, self.running_step = time.perf_counter(), step + 1
                loss, norm = self._train_step(step)
                rate = samples / (time.perf_counter() - tick)
                lr = self.scheduler.get_last_lr()[0]
                progress.update(step + 1, loss, lr, rate)
                if (step + 1) % t.log_every == 0 or step + 1 == self.total_steps:
                    self._log({"step": step + 1, "epoch": (step + 1) / self.steps_per_epoch, "loss": loss, "lr": lr,
                               "grad_norm": norm, "samples_per_s": rate})
                self._maybe_eval(step + 1)
                if self.stops.requested if self.world == 1 else self.stop_voted:
                    self._stop_at(step + 1)
        self._checkpoint(self.total_steps)
        distributed.barrier()

    def _stop_at(self, step: int) -> None:
        """Stop on a signal at this step boundary, its state saved: the run resumes from here bit for bit."""
        if self.saved_step != step:
            self._checkpoint(step)
        raise KeyboardInterrupt

    def _stop_notice(self) -> None:
        if not self.main:
            return
        when = (f"after step {self.running_step}/{self.total_steps}" if self.world == 1 else
                "after this step, on every process")
        self.console.print(f"\n[yellow]stopping[/] {when} (its dev evaluation and checkpoint included); a second "
                           f"Ctrl-C stops at once, from the last checkpoint", soft_wrap=True)

    def release(self) -> None:
        """Drop the model, optimizer and data (before the process group is destroyed: FSDP's tensors hold it)."""
        for name in ("forward_model", "model", "optimizer", "scheduler", "params", "s"):
            self.__dict__.pop(name, None)

    # ---- finishing -----------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Restore the best dev checkpoint, save the result, score the eval split; returns results.json.

        Under FSDP, and for a generation eval, every rank calls it (`all_evaluate`); only rank 0 writes, and the
        others get {}.
        """
        best = self.out / "checkpoints" / "best" / "trainable.safetensors"
        read = lambda: {"best": best.read_bytes()} if best.is_file() else {}  # noqa: E731
        files = distributed.from_rank0(read) if self.all_evaluate else read()  # every rank finishes
        if files:
            from safetensors.torch import load

            load_trainable_state(self.model, load(files["best"]))
        path = save_result(self.model, self.recipe.method.name, self.out, task=self.s.task,
                           recipe=self.recipe.to_dict(), tokenizer=self.s.tokenizer) if self.main else None
        after, records = self.evaluate_report()
        if not self.main:
            return {}
        atomic.write_text(self.out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        results = {"method": self.recipe.method.name, "task": self.s.task["name"], "result": str(path),
                   "trainable_params": trainable_count(self.model), "steps": self.total_steps,
                   "best_step": self.state["best_step"], "best_dev": self.state["best_dev"],
                   "before": self.state["before"], "after": after}
        atomic.write_text(self.out / "results.json", json.dumps(results, indent=2))
        self.tracking.scores(after, self.total_steps)
        self.tracking.close()
        return results
