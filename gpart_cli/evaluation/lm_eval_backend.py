"""`gpart eval --lm-eval TASKS`: EleutherAI's lm-evaluation-harness on the model gpart loaded.

The adapted model stays in memory as `gpart eval` scores it (a .gpart adapter applied on the fly, a merged dir, a
PEFT adapter folded in, or a plain base) and is handed to the harness's `HFLM` wrapper with its tokenizer, so the
harness scores exactly those weights in the precision the run trained in (bf16 autocast runs keep it). The
harness's numbers land in the usual scores JSON (`TASK/METRIC` keys) and its per-document records in the
predictions JSONL beside it.

lm-evaluation-harness is an optional extra: `pip install 'gpart[lm-eval]'`. Task definitions of your own
(a YAML over a local jsonl) are read from --lm-eval-include dirs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import atomic
from ..adapters.devices import eval_precision, resolve_device
from ..adapters.loading import load_tokenizer
from ..adapters.reference import load_scored
from ..errors import GpartError
from .runner import scores_path

INSTALL = "pip install 'gpart[lm-eval]'"
TASK_LABEL = "lm-eval"  # the scores JSON's "task" and its default name, eval-lm-eval.json


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the import that needs the harness's extras)
    except ImportError:
        raise GpartError(f"--lm-eval needs lm-evaluation-harness, an optional extra: {INSTALL}") from None
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise GpartError("--lm-eval takes comma-separated task names, e.g. --lm-eval arc_easy,hellaswag")
    return tasks


def check(req) -> None:
    """Refuse flags that have no meaning for the harness (it reads its own data and generates itself)."""
    given = [flag for flag, value in (("--predictions", req.predictions), ("--data", req.data), ("--split", req.split),
                                      ("--max-new-tokens", req.max_new_tokens)) if value]
    if req.backend != "hf":
        given.append("--backend")
    if given:
        raise GpartError(f"--lm-eval reads each task's data and settings from its task definition; drop "
                         f"{', '.join(given)}")


def scores_of(results: dict) -> dict:
    """The harness's {task: {"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}} as {"task/acc": 0.5, ...}.

    The filter name is kept when it is not the default one ("gsm8k/exact_match,strict-match")."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{task}/{key.removesuffix(',none')}"] = value
    return out


def records_of(samples: dict) -> list[dict]:
    """One predictions record per scored document: task, doc id, the prompt (its first request's context), target,
    the model's filtered responses (log-likelihoods or generations) and the document's metrics."""
    records = []
    for task, docs in samples.items():
        for s in docs:
            arguments = s.get("arguments") or [[None]]
            metrics = {m: s[m] for m in s.get("metrics", []) if m in s}
            records.append({"task": task, "idx": s.get("doc_id"), "filter": s.get("filter"), "prompt": arguments[0][0],
                            "target": s.get("target"), "responses": s.get("filtered_resps"), **metrics})
    return records


def task_manager(tasks: list[str], include: list[Path] | None):
    """The harness's TaskManager that knows `tasks`: the --lm-eval-include dirs alone when they define them all (the
    harness's ~15,000 built-in definitions take a minute to index), else those dirs and the built-in tasks."""
    from lm_eval.tasks import TaskManager

    missing = [str(p) for p in include or [] if not Path(p).is_dir()]
    if missing:
        raise GpartError(f"--lm-eval-include {', '.join(missing)}: not a directory of task YAML files")
    paths = [str(p) for p in include or []] or None
    if paths:
        own = TaskManager(include_path=paths, include_defaults=False)
        if all(t in own.all_tasks for t in tasks):
            return own
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise GpartError(f"--lm-eval: unknown task {', '.join(unknown)}; `lm-eval ls tasks` lists the harness's, "
                         f"and --lm-eval-include DIR adds task YAMLs of your own")
    return manager


def _model(req, device, precision):
    """The scored model and its tokenizer; a PEFT adapter is folded in (the harness wants a plain model)."""
    model, source = load_scored(req, req.adapter, "causal_lm", device, precision)
    if req.adapter is not None and req.adapter.kind == "peft":
        model = model.merge_and_unload()
    return model.eval(), load_tokenizer(source)


def evaluate(req, tasks: list[str], num_fewshot: int | None = None, include: list[Path] | None = None) -> dict:
    """Run the harness's `tasks` on the model `req` names; write the scores JSON and predictions; return the doc."""
    check(req)
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include)
    device = resolve_device(req.device)
    precision = eval_precision(device, req.adapter.recipe if req.adapter else None, req.dtype)
    model, tokenizer = _model(req, device, precision)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=req.batch_size, device=str(device))
    with precision.context(device):
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=req.limit,
                                      task_manager=manager, log_samples=True, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
    output = scores_path(req, TASK_LABEL)
    predictions = output.with_suffix(".predictions.jsonl")
    doc = {"task": TASK_LABEL, "lm_eval_tasks": tasks, "num_fewshot": num_fewshot, "scores": scores_of(out["results"]),
           "adapter": req.adapter.given if req.adapter else None, "model": req.model, "limit": req.limit,
           "batch_size": req.batch_size, "backend": "lm-eval", "device": str(device), **precision.record(model),
           "lm_eval_version": getattr(lm_eval, "__version__", None), "predictions_file": str(predictions)}
    atomic.write_text(output, json.dumps(doc, indent=2))
    atomic.write_text(predictions, "".join(json.dumps(r, default=str) + "\n" for r in records_of(out["samples"])))
    return doc
