"""`gpart` commands (docs/design.md §5). Exit codes: 0 ok, 2 user error (a `GpartError`), 1 internal error."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import GpartError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune Hugging Face models with GPart: one vector theta, partitioned over all weights.")
console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Turn a `GpartError` into a clear message and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GpartError as e:
            _exit_with(e)

    return wrapper


def _exit_with(e: GpartError):
    # escape: messages quote install commands like pip install 'gpart[vllm]', which Rich reads as markup
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped with the "
                                                "model repository (never taken from an adapter file).")]


def _resolved_device(value: Optional[str]) -> Optional[str]:
    """Every command's --device, resolved where it is parsed (by `devices.resolve_device`, the one resolver): a typo
    or a GPU this machine lacks stops the command with exit 2 before any model or data is loaded. "cuda" becomes
    "cuda:N"; unset and "auto" stay as they are (under torchrun each process then takes its local device)."""
    if value is None or value.strip().lower() == "auto":
        return value
    from ..devices import resolve_device

    try:
        return str(resolve_device(value))
    except GpartError as e:
        _exit_with(e)


Device = Annotated[Optional[str], typer.Option(callback=_resolved_device, help="auto | cpu | cuda | cuda:N (default "
                                               "auto: cuda when torch sees a GPU, else cpu).")]


@app.command()
@user_errors
def inspect(adapter: Annotated[str, typer.Argument(help="A .gpart adapter file, an authors' GPart adapter dir, or "
                                                      "hf://user/name on the Hub.")],
            as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
            model: Annotated[Optional[str], typer.Option(help="Authors' adapters: the base model whose config resolves "
                                                              "the targets (default: the one the adapter records).")]
            = None, trust_remote_code: TrustRemoteCode = False):
    """Show an adapter: d, seed, partition, targets, N, base fingerprint, head, theta stats, recipe."""
    from ..hub import adapter_path
    from ..inspection import render, summarize
    from ..interop.convert import open_adapter

    summary = summarize(open_adapter(adapter_path(adapter), model, trust_remote_code))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        render(summary, console)


@app.command()
@user_errors
def merge(base: Annotated[str, typer.Argument(help="Base model: a transformers dir, hub id or pkg:PACKAGE/dir.")],
          adapter: Annotated[str, typer.Argument(help="The .gpart adapter to fold in (a file or hf://user/name), or "
                                                      "an authors' GPart adapter (dir or either of its files).")],
          output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write the merged model to.")],
          dtype: Annotated[Optional[str], typer.Option(help="float32 | bfloat16 | float16 (default: the "
                                                             "dtype the adapter was trained on).")] = None,
          trust_remote_code: TrustRemoteCode = False, device: Device = None,
          check: Annotated[bool, typer.Option("--check", help="Print the largest difference between merged and "
                                                              "unmerged logits on a few fixed inputs.")] = False):
    """Write a standard transformers model dir with the target weights = W0 + Pθ and the head restored."""
    from ..devices import resolve_device
    from ..export import merge_to_dir
    from ..hub import adapter_path

    where = resolve_device(device)
    adapter_file = adapter_path(adapter)
    with console.status(f"merging on {where}"):
        out = merge_to_dir(base, adapter_file, output, dtype, trust_remote_code, where, check=check)
    if check:
        out, result = out
        console.print(result.describe())
    console.print(f"merged model written to [bold]{out}[/] (loads with AutoModel*.from_pretrained)")
    if json.loads((out / "config.json").read_text()).get("gpart_pooling") == "mean":
        err_console.print("[yellow]note:[/] this model was trained with model.pooling: mean (recorded as gpart_pooling "
                          "in config.json). gpart eval applies it; plain transformers pools with [CLS] instead")


@app.command()
@user_errors
def convert(source: Annotated[Path, typer.Argument(help="An authors' GPart adapter dir, or a .gpart file with "
                                                        "--to peft-gpart.")],
            output: Annotated[Path, typer.Option("-o", "--output", help="The .gpart file, or the dir to write.")],
            to: Annotated[str, typer.Option(help="gpart (a .gpart file) or peft-gpart (the authors' format).")]
            = "gpart",
            model: Annotated[Optional[str], typer.Option(help="Base model whose config resolves the authors' "
                                                              "target_modules (default: the one the adapter "
                                                              "records).")] = None,
            trust_remote_code: TrustRemoteCode = False):
    """Convert between a .gpart adapter and the authors' PEFT-fork GPart format (their partitions only)."""
    from ..interop.convert import to_gpart, to_peft_gpart

    if to == "gpart":
        out = to_gpart(source, output, model, trust_remote_code)
    elif to == "peft-gpart":
        out = to_peft_gpart(source, output)
    else:
        raise GpartError(f"--to {to!r}: use gpart or peft-gpart")
    console.print(f"wrote [bold]{out}[/]")


Overrides = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: "
                                                   "--set train.lr_theta=1e-3 (repeatable).")]


@app.command()
@user_errors
def train(recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/).")],
          overrides: Overrides = None,
          output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory "
                                                          "(default runs/RECIPE_NAME).")] = None,
          resume: Annotated[bool, typer.Option(help="Continue the run in --output from its last checkpoint.")] = False,
          overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --output.")] = False,
          dry_run: Annotated[bool, typer.Option(help="Validate the recipe, load model and data, then stop.")] = False,
          device: Device = None):
    """Fine-tune a model from a YAML recipe: writes adapter, metrics.jsonl, checkpoints and results.json."""
    from ..recipe import load_recipe
    from ..train.run import default_output, run

    parsed = load_recipe(recipe, overrides or [])
    out = output or default_output(parsed)
    try:
        run(parsed, out, resume=resume, overwrite=overwrite, dry_run=dry_run, console=err_console, device=device)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command(name="eval")
@user_errors
def evaluate(task: Annotated[Optional[str], typer.Option(help="glue/<task>, vision/<dataset>, gsm8k, math (the "
                                                            "5,000-problem test), math500 or mawps.")] = None,
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
    """Score a model, an adapter, or given predictions on a task."""
    from ..evaluation.runner import EvalRequest, evaluate as run_eval
    from ..hub import adapter_path

    from ..evaluation.multi import evaluate_many, split_adapters, summary_table

    if (task is None) == (lm_eval is None):
        raise GpartError("give either --task or --lm-eval TASKS" if task is None else
                         "--lm-eval runs harness tasks in place of --task; run them as two commands")
    many = split_adapters(adapter)
    req = EvalRequest(task=task or "lm-eval", adapter=None if many else adapter_path(adapter), model=model, data=data,
                      split=split, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      predictions=predictions, output=output, trust_remote_code=trust_remote_code, gguf_file=gguf_file,
                      device=device, dtype=dtype, backend=backend, tensor_parallel_size=tensor_parallel_size,
                      merged_dir=merged_dir)
    err_console.print(f"evaluating {task or lm_eval} …")  # generation tasks show their own progress bar
    if many:
        if lm_eval is not None:
            raise GpartError("--lm-eval scores one adapter at a time; run one command per adapter")
        summary = evaluate_many(req, [adapter_path(str(p)) for p in many])
        console.print(summary_table(summary))
        console.print(f"scores: {req.output or 'eval-' + task.replace('/', '-') + '.json'} (one JSON per adapter "
                      f"beside it)")
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
    console.print(f"scores: {req.output or 'eval-' + task.replace('/', '-') + '.json'} · predictions: "
                  f"{doc['predictions_file']}{where}")


@app.command()
@user_errors
def push(run: Annotated[Path, typer.Argument(help="A finished run dir (the --output of gpart train).")],
         repo: Annotated[str, typer.Option(help="Hub model repo, user/name (created when missing).")],
         private: Annotated[bool, typer.Option(help="Create the repo private.")] = False):
    """Upload a run's adapter, recipe.yaml, results.json and a model card to the Hugging Face Hub."""
    from ..hub import push as push_run

    with console.status(f"pushing {run} to {repo}"):
        url = push_run(run, repo, private)
    console.print(f"pushed to [bold]{url}[/] · use it with --adapter hf://{repo}")


@app.command(name="sweep-d")
@user_errors
def sweep_d(recipe: Annotated[Path, typer.Argument(help="A recipe YAML file.")],
            d: Annotated[str, typer.Option("--d", help="Comma-separated d values, e.g. 1000,4000,16000.")],
            seeds: Annotated[str, typer.Option(help="Comma-separated seeds (method and training seed).")] = "0",
            method: Annotated[str, typer.Option(help="Comma-separated methods side by side, e.g. gpart,unilora.")]
            = "gpart",
            lr: Annotated[Optional[list[str]], typer.Option("--lr", help="Learning-rate grid for θ / the adapter "
                          "(linear_probe: its head), chosen per (method, d, seed) on the dev split: "
                          "--lr 5e-3,2e-2,5e-2 for every method, --lr full=5e-5,2e-4 for one (repeatable).")] = None,
            lr_head: Annotated[Optional[str], typer.Option("--lr-head", help="Head learning rates crossed with "
                               "--lr (e.g. 5e-3,2e-2), or 'tie' to train the head at the run's --lr.")] = None,
            overrides: Overrides = None,
            output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Sweep directory (default "
                                                            "runs/sweep-RECIPE_NAME).")] = None,
            device: Device = None):
    """Train and evaluate one run per d, seed and learning rate; the dev split picks the lr; write a table,
    results.csv/json and plot.png."""
    from ..recipe import METHODS
    from ..sweep import parse_ints, parse_lr_grid, parse_lr_head, sweep

    methods = [m.strip() for m in method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise GpartError(f"--method {method!r}: use some of {', '.join(METHODS)}")
    out = output or Path("runs") / f"sweep-{recipe.stem}"
    sweep(recipe, overrides or [], methods, parse_ints(d, "--d"), parse_ints(seeds, "--seeds"), out, err_console,
          lrs=parse_lr_grid(lr or [], methods), lr_heads=parse_lr_head(lr_head), device=device)
    console.print(f"results: {out / 'results.csv'} · {out / 'results.json'} · plot {out / 'plot.png'}")


def main() -> None:
    import logging
    import os

    # Library tqdm bars (GGUF dequantizing, datasets casting, shards) would garble the Rich progress display.
    # tqdm reads TQDM_DISABLE when it is imported, which happens before this runs, so switch its default too.
    os.environ.setdefault("TQDM_DISABLE", "1")
    if os.environ["TQDM_DISABLE"] == "1":
        from functools import partialmethod

        import tqdm

        tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)
    import transformers

    transformers.logging.set_verbosity_error()  # load reports and bars would drown the progress display
    transformers.logging.disable_progress_bar()
    # bitsandbytes (imported by peft whenever it is installed) warns at import, on CPUs with AVX512-BF16, that an
    # optional kernels package is missing: noise for every run that does not quantize, and not needed by those that do.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    app()
