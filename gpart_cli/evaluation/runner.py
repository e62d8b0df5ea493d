"""`gpart eval` (docs/design.md §5, §7): score a base model, a merged dir, a .gpart adapter, a PEFT adapter or a run dir
on a task, or score predictions produced elsewhere. Writes scores JSON and per-example predictions JSONL.

The scores JSON records how the numbers were made: device, weights dtype and autocast, batch size, and for
generation the max_new_tokens. An adapter or run is scored on the data its recipe names (dataset, split, columns,
classes, max length, image transform) unless --data / --split say otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .. import atomic
from ..adapters.devices import eval_precision, resolve_device
from ..adapters.loading import FAMILY_TASK_TYPE, load_image_processor, load_tokenizer
from ..adapters.reference import AdapterRef, load_scored
from ..data.sources import local_copies_hint
from ..errors import GpartError
from . import classify, vllm_backend
from .tasks import GENERATION_TASKS, load_task_rows, max_new_tokens_for, run_generation, score_outputs


@dataclass(frozen=True)
class EvalRequest:
    task: str
    adapter: AdapterRef | None = None  # opened once by the command (`adapters.reference.open_adapter`)
    model: str | None = None
    data: list[str] | None = None
    split: str | None = None
    limit: int | None = None
    batch_size: int = 32
    max_new_tokens: int | None = None  # None: the task's reference length
    predictions: Path | None = None
    output: Path | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None     # a GGUF base given with --model
    device: str | None = None        # None: cuda when available, else cpu
    dtype: str | None = None         # None: the precision the run trained in
    backend: str = "hf"              # generation tasks: hf (transformers generate) | vllm (see vllm_backend)
    tensor_parallel_size: int = 1    # vllm: GPUs one model is split over
    merged_dir: Path | None = None   # vllm: where an adapter is merged (kept); None: a temporary dir under $TMPDIR


def check_gguf_file(gguf_file: str | None, model: str | None) -> None:
    if gguf_file and (not model or Path(gguf_file).name != gguf_file):
        raise GpartError("--gguf-file takes a file name inside the --model dir (an adapter's run records its own GGUF "
                         "file, used when --model is the base it names)")


def recorded_task(refs: list[AdapterRef]) -> str:
    """The task `gpart eval` scores when --task is not given: the one every adapter's run recorded."""
    tasks = {ref.eval_task for ref in refs}
    if not refs or None in tasks:
        without = next((ref.given for ref in refs if ref.eval_task is None), None)
        raise GpartError("give --task (or --lm-eval TASKS)" + (f": {without} records no task to score on" if without
                                                                else ""))
    if len(tasks) > 1:
        raise GpartError(f"the adapters were trained for different tasks ({', '.join(sorted(tasks))}); give --task")
    return tasks.pop()


def scores_path(req: EvalRequest, label: str | None = None) -> Path:
    """Where the scores JSON of `req` goes (its predictions JSONL beside it), for the task `label` (default req.task):

    - --output FILE: there; --output DIR (an existing folder): DIR/eval-TASK.json;
    - an adapter: its run dir (`AdapterRef.run_dir`) gets eval-TASK.json; any other adapter file or folder:
      NAME.eval-TASK.json beside it;
    - predictions made elsewhere: NAME.eval-TASK.json beside that file;
    - a local --model folder: NAME.eval-TASK.json beside it;
    - else (a hub or pkg: model, an hf:// adapter in the Hub cache): runs/eval/MODEL/eval-TASK.json.
    Never a file in the current folder by default: scores of different models would overwrite each other there.
    """
    name = f"eval-{(label or req.task).replace('/', '-')}.json"
    if req.output is not None:
        return req.output / name if req.output.is_dir() else req.output
    if req.adapter is not None and not req.adapter.from_hub:
        run = req.adapter.run_dir
        return run / name if run is not None else _beside(req.adapter.path, name)
    if req.predictions is not None:
        return _beside(req.predictions, name)
    if req.model is not None and Path(req.model).is_dir():
        return _beside(Path(req.model), name)
    model = (req.model or (req.adapter.path.parent.name if req.adapter else "model")).removeprefix("pkg:")
    return Path("runs") / "eval" / model.strip("/").replace("/", "--") / name


def _beside(path: Path, name: str) -> Path:
    return path.parent / f"{path.stem if path.is_file() else path.name}.{name}"


def parse_task(task: str) -> tuple[str, str]:
    """("glue", "sst2"), ("vision", "fashion_mnist") or ("generation", "gsm8k")."""
    family, _, name = task.partition("/")
    if family in FAMILY_TASK_TYPE and family != "sft" and name:  # SFT runs are scored on a generation task
        return family, name
    if task in GENERATION_TASKS:
        return "generation", task
    raise GpartError(f"unknown task {task!r}; use glue/<task>, vision/<dataset>, text_classification/<name>, or "
                     f"one of {', '.join(GENERATION_TASKS)}")


def _data_section(req: EvalRequest, family: str, name: str, recipe: dict | None):
    """The data section to score: the run's recipe's when it trained on this task, else one built from the flags."""
    from ..recipe.schema import DataSection

    recorded = dict((recipe or {}).get("data") or {})
    fields = {f.name for f in dataclasses.fields(DataSection)}
    if recorded.get("family") == family and recorded.get("task") == name:
        data = DataSection(**{k: v for k, v in recorded.items() if k in fields})
    else:
        data = DataSection(family=family, task=name, path=None if req.data or family == "glue" else name,
                           max_length=512)
    return dataclasses.replace(data, eval_files=list(req.data) if req.data else data.eval_files,
                               eval_split=req.split or data.eval_split)


def _glue_dataset(data, name: str, tokenizer, limit: int | None):
    from transformers import DataCollatorWithPadding

    from ..data.glue import glue_task, load_glue_rows, tokenize_rows

    task = glue_task(name)
    split = task.eval_split if data.eval_split == "validation" else data.eval_split
    rows, columns = load_glue_rows(data, data.eval_files, split, None, 0, "eval data")
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    return tokenize_rows(rows, task, columns, data.label_column, tokenizer, data.max_length), \
        DataCollatorWithPadding(tokenizer)


def _classification(req: EvalRequest, family: str, name: str, ref: AdapterRef | None, device, precision,
                    load=load_scored):
    model, source = load(req, ref, FAMILY_TASK_TYPE[family], device, precision)
    recipe = ref.recipe if ref else None
    data = _data_section(req, family, name, recipe)
    if family == "glue":
        dataset, collate = _glue_dataset(data, name, load_tokenizer(source), req.limit)
    elif family == "text_classification":
        from ..data.text_classification import eval_dataset

        names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]  # the run's class order
        dataset, collate = eval_dataset(data, load_tokenizer(source), names, req.limit)
    else:
        from ..data.vision import collate_images, eval_items

        config = model.config
        labels = [config.id2label[i] for i in range(config.num_labels)] if recipe else None
        dataset = eval_items(data, config, labels, load_image_processor(source), limit=req.limit)
        collate = collate_images
    preds, refs = classify.predict(model, dataset, collate, req.batch_size, device, precision.autocast)
    records = [{"idx": i, "prediction": p, "reference": r} for i, (p, r) in enumerate(zip(preds, refs))]
    return classify.score(family, name, preds, refs), records, model


def _read_predictions(path: Path, n: int) -> list[str]:
    outputs: dict[int, str] = {}
    try:
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                outputs[int(row["idx"])] = str(row["output"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GpartError(f"--predictions {path}: each line must be {{\"idx\": int, \"output\": str}} ({e})") from None
    missing = [i for i in range(n) if i not in outputs]
    if missing:
        raise GpartError(f"--predictions {path} has no output for idx {missing[:5]} (of {n} examples); "
                         f"use --limit to score a prefix")
    return [outputs[i] for i in range(n)]


def _generation(req: EvalRequest, name: str, ref: AdapterRef | None, device, precision, load=load_scored):
    rows = load_task_rows(name, req.data, req.split, req.limit)
    from .templates import eval_rendering

    model, source = load(req, ref, "causal_lm", device, precision)
    if ref is not None and ref.kind in ("gpart", "authors"):
        # Decode merged: an unmerged layer would rebuild its W_eff for every token.
        from ..core.model import merge

        model = merge(model)
    tokenizer = load_tokenizer(source)
    scores, records = run_generation(name, model, tokenizer, rows, req.batch_size, req.max_new_tokens,
                                     autocast=precision.autocast, rendering=eval_rendering(ref, tokenizer))
    return scores, records, model


def evaluate(req: EvalRequest, load=load_scored) -> dict:
    """Run the evaluation, write scores and predictions, return the scores document. `load` is how the model is
    loaded (`models.load_scored`; `multi` passes one that keeps the base and swaps adapters)."""
    with local_copies_hint("Pass local copies with --data FILE"):  # offline: a request has no recipe to fix
        return _evaluate(req, load)


def _evaluate(req: EvalRequest, load) -> dict:
    family, name = parse_task(req.task)
    vllm_backend.check(req, family)
    run: dict = {"batch_size": req.batch_size, "backend": req.backend}
    if family == "generation":
        run["max_new_tokens"] = max_new_tokens_for(name, req.max_new_tokens)
    if family == "generation" and req.predictions is not None:
        rows = load_task_rows(name, req.data, req.split, req.limit)
        scores, records = score_outputs(name, rows, _read_predictions(req.predictions, len(rows)))
        run = {"predictions": str(req.predictions)}
    elif req.predictions is not None:
        raise GpartError("--predictions scores generated text; it applies to gsm8k, math, math500 and mawps")
    else:
        device, ref = resolve_device(req.device), req.adapter
        precision = eval_precision(device, ref.recipe if ref else None, req.dtype)
        if family == "generation" and req.backend == "vllm":
            rows = load_task_rows(name, req.data, req.split, req.limit)
            scores, records = vllm_backend.run_generation(req, name, rows, ref, precision, device=device)
            run.update({"device": f"cuda (vLLM, tensor_parallel_size {req.tensor_parallel_size})",
                        "dtype": vllm_backend.vllm_dtype(precision), "autocast": None})
        else:
            if family == "generation":
                scores, records, model = _generation(req, name, ref, device, precision, load)
            else:
                scores, records, model = _classification(req, family, name, ref, device, precision, load)
            run.update({"device": str(device), **precision.record(model)})
    output = scores_path(req)
    doc = {"task": req.task, "scores": scores, "adapter": req.adapter.given if req.adapter else None,
           "model": req.model, "data": req.data, "limit": req.limit, **run,
           "predictions_file": str(output.with_suffix(".predictions.jsonl"))}
    atomic.write_text(output, json.dumps(doc, indent=2))
    atomic.write_text(output.with_suffix(".predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return doc
