"""`gpart eval`: score a model, an adapter or given predictions on a task (docs/design.md §5.1, §7)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import GpartError
from .common import Device, TrustRemoteCode, console, err_console, user_errors


@user_errors
def evaluate(task: Annotated[Optional[str], typer.Option(help="glue/<task>, text_classification/<name>, "
                                                            "vision/<dataset>, gsm8k, math (the 5,000-problem test), "
                                                            "math500 or mawps.")] = None,
             adapter: Annotated[Optional[str], typer.Option(help="A .gpart file, PEFT adapter dir (the authors' GPart "
                                                                 "ones too), merged model dir, gpart run dir, or "
                                                                 "hf://user/name; a,b,... scores several .gpart "
                                                                 "adapters on one loaded base.")] = None,
             model: Annotated[Optional[str], typer.Option(help="Base or merged model: dir, hub id or "
                                                               "pkg:PACKAGE/dir.")] = None,
             gguf_file: Annotated[Optional[str], typer.Option(help="A GGUF file inside --model's dir (a quantized "
                                                                   "base, dequantized on load).")] = None,
             data: Annotated[Optional[list[str]], typer.Option(help="Local data file(s) instead of the hub.")] = None,
             split: Annotated[Optional[str], typer.Option(help="Split name on the hub.")] = None,
             limit: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N examples.")] = None,
             batch_size: Annotated[int, typer.Option(min=1)] = 32,
             max_new_tokens: Annotated[Optional[int], typer.Option(min=1, help="Generation length (default per "
                                                                   "task: gsm8k 512, math/math500 2048, mawps 256).")]
             = None,
             predictions: Annotated[Optional[Path], typer.Option(help="Score JSONL lines {idx, output} produced "
                                                                      "elsewhere; no model is loaded.")] = None,
             output: Annotated[Optional[Path], typer.Option(help="Scores JSON (predictions JSONL goes beside "
                                                                 "it).")] = None,
             trust_remote_code: TrustRemoteCode = False, device: Device = None,
             dtype: Annotated[Optional[str], typer.Option(help="Load the weights in float32 | bfloat16 | float16 "
                                                               "(default: the precision the run trained in; a plain "
                                                               "model: its own dtype on a GPU, float32 on CPU).")]
             = None,
             backend: Annotated[str, typer.Option(help="Generation tasks: hf (transformers generate) or vllm (pip "
                                                       "install 'gpart[vllm]'; adapters are merged first).")] = "hf",
             tensor_parallel_size: Annotated[int, typer.Option(min=1, help="--backend vllm: GPUs to split the "
                                                                         "model over.")] = 1,
             merged_dir: Annotated[Optional[Path], typer.Option(help="--backend vllm: merge an adapter into this "
                                                                     "new dir and keep it (default: a temporary dir "
                                                                     "under $TMPDIR).")] = None,
             lm_eval: Annotated[Optional[str], typer.Option("--lm-eval", help="lm-evaluation-harness tasks instead "
                                                            "of --task, e.g. arc_easy,hellaswag (pip install "
                                                            "'gpart[lm-eval]').")] = None,
             num_fewshot: Annotated[Optional[int], typer.Option(min=0, help="--lm-eval: few-shot examples per "
                                                                "prompt (default: each task's own).")] = None,
             lm_eval_include: Annotated[Optional[list[Path]], typer.Option(help="--lm-eval: a dir of task YAML "
                                                                           "files of your own (repeatable).")] = None):
    """Score a model, an adapter, or given predictions on a task (an adapter's run dir: the task it recorded)."""
    from ..adapters.reference import open_adapter
    from ..evaluation.multi import evaluate_many, split_adapters, summary_table
    from ..evaluation.runner import EvalRequest, check_gguf_file, recorded_task, scores_path
    from ..evaluation.runner import evaluate as run_eval

    if task is not None and lm_eval is not None:
        raise GpartError("--lm-eval runs harness tasks in place of --task; run them as two commands")
    check_gguf_file(gguf_file, model)
    many = split_adapters(adapter)
    refs = [open_adapter(a) for a in (many or ([adapter] if adapter else []))]  # each read once, before any load
    if task is None and lm_eval is None:
        task = recorded_task(refs)
    req = EvalRequest(task=task or "lm-eval", adapter=None if many or not refs else refs[0], model=model, data=data,
                      split=split, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      predictions=predictions, output=output, trust_remote_code=trust_remote_code, gguf_file=gguf_file,
                      device=device, dtype=dtype, backend=backend, tensor_parallel_size=tensor_parallel_size,
                      merged_dir=merged_dir)
    err_console.print(f"evaluating {task or lm_eval} …")  # generation tasks show their own progress bar
    if many:
        if lm_eval is not None:
            raise GpartError("--lm-eval scores one adapter at a time; run one command per adapter")
        summary = evaluate_many(req, refs)
        console.print(summary_table(summary))
        console.print(f"scores: {summary['output']} · each adapter's: "
                      f"{', '.join(d['output'] for d in summary['adapters'])}")
        return
    if lm_eval is not None:
        from ..evaluation import lm_eval_backend

        doc = lm_eval_backend.evaluate(req, lm_eval_backend.parse_tasks(lm_eval), num_fewshot, lm_eval_include)
        task = lm_eval_backend.TASK_LABEL
    else:
        doc = run_eval(req)
    table = Table(title=f"{task}" + (f" · {limit} examples" if limit else ""))
    table.add_column("metric")
    table.add_column("score", justify="right")
    for key, value in doc["scores"].items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    where = f" · {doc['device']}, {doc['dtype']}" + (f" + {doc['autocast']} autocast" if doc.get("autocast") else "") \
        if "device" in doc else ""
    console.print(f"scores: {scores_path(req, task)} · predictions: {doc['predictions_file']}{where}")
