"""`gpart eval` (DESIGN §5, §7): score a base model, a merged dir, a .gpart adapter, a PEFT adapter or a run dir
on a task, or score predictions produced elsewhere. Writes scores JSON and per-example predictions JSONL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import atomic
from ..errors import GpartError
from ..loading import ModelSource, load_model, load_tokenizer, recorded_source
from ..methods import RUN_INFO
from . import classify, vllm_backend
from .tasks import GENERATION_TASKS, load_task_rows, run_generation, score_outputs

FAMILY_TASK_TYPE = {"glue": "sequence_classification", "vision": "image_classification"}


@dataclass(frozen=True)
class EvalRequest:
    task: str
    adapter: Path | None = None
    model: str | None = None
    data: list[str] | None = None
    split: str | None = None
    limit: int | None = None
    batch_size: int = 32
    max_new_tokens: int = 256
    predictions: Path | None = None
    output: Path | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None     # a GGUF base given with --model
    backend: str = "hf"              # generation tasks: hf (transformers generate) | vllm (see vllm_backend)
    tensor_parallel_size: int = 1    # vllm: GPUs one model is split over


def parse_task(task: str) -> tuple[str, str]:
    """("glue", "sst2"), ("vision", "fashion_mnist") or ("generation", "gsm8k")."""
    family, _, name = task.partition("/")
    if family in FAMILY_TASK_TYPE and name:
        return family, name
    if task in GENERATION_TASKS:
        return "generation", task
    raise GpartError(f"unknown task {task!r}; use glue/<task>, vision/<dataset>, or one of "
                     f"{', '.join(GENERATION_TASKS)}")


def _run_info(path: Path) -> dict:
    info = path / RUN_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def resolve_adapter(path: Path) -> tuple[str, Path]:
    """("gpart" | "peft" | "merged", path) for an adapter file, a PEFT dir, a merged dir, or a run dir."""
    if path.is_file():
        return "gpart", path
    if (path / "adapter.gpart").is_file():
        return "gpart", path / "adapter.gpart"
    if (path / "adapter_config.json").is_file():
        return "peft", path
    if (path / "adapter" / "adapter_config.json").is_file():
        return "peft", path / "adapter"
    if (path / "config.json").is_file():
        return "merged", path
    if (path / "model" / "config.json").is_file():
        return "merged", path / "model"
    raise GpartError(f"--adapter {path} is neither a .gpart file, a PEFT adapter dir, a model dir, nor a gpart run dir")


def _recorded_base(recorded: str | None, adapter: Path) -> str:
    """The base an adapter file names, used without --model only when it is a hub id or pkg: model.

    A local path written inside an adapter is not followed on its own: an adapter must not make gpart read
    files the user did not name.
    """
    if not recorded:
        raise GpartError(f"{adapter} does not record its base model; pass --model")
    local = recorded.startswith(("/", ".", "~")) or Path(recorded).exists()
    if local:
        raise GpartError(f"{adapter} was trained on the local model {recorded}; pass --model {recorded} to confirm "
                         f"(gpart does not open local paths named only inside an adapter)")
    return recorded


def load_for_eval(req: EvalRequest, task_type: str):
    """(model, tokenizer) for the request; the tokenizer is None for vision."""
    from ..export import load_adapted

    if req.adapter is None:
        if not req.model:
            raise GpartError("give --model (a base or merged model) and/or --adapter")
        source = ModelSource(req.model, trust_remote_code=req.trust_remote_code, gguf_file=req.gguf_file)
        return load_model(source, task_type), _tokenizer(source, task_type)
    kind, path = resolve_adapter(req.adapter)
    if kind == "gpart":
        from ..artifact import read_artifact

        art = read_artifact(path)
        base = req.model or _recorded_base((art.meta.get("base_model") or {}).get("name_or_path"), path)
        model, _, source = load_adapted(base, path, trust_remote_code=req.trust_remote_code)
        return model, _tokenizer(source, task_type)
    info = _run_info(path)
    if kind == "merged":
        source = recorded_source(str(path), info.get("recipe"), trust_remote_code=req.trust_remote_code)
        return load_model(source, task_type), _tokenizer(source, task_type)
    from peft import PeftModel

    recorded = ((info.get("recipe") or {}).get("model") or {}).get("name_or_path") or \
        json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base = req.model or _recorded_base(recorded, path)
    source = recorded_source(base, info.get("recipe"), trust_remote_code=req.trust_remote_code)
    task = info.get("task") or {}
    model = load_model(source, task_type, task.get("num_labels"), task.get("labels"))
    return PeftModel.from_pretrained(model, str(path)), _tokenizer(source, task_type)


def _tokenizer(source: ModelSource, task_type: str):
    return None if task_type == "image_classification" else load_tokenizer(source)


def _classification(req: EvalRequest, family: str, name: str) -> tuple[dict, list[dict]]:
    from ..recipe import DataSection

    files = list(req.data) if req.data else None
    data = DataSection(family=family, task=name, eval_files=files, train_files=files,
                       eval_split=req.split or "validation", max_eval_samples=None)
    model, tokenizer = load_for_eval(req, FAMILY_TASK_TYPE[family])
    if family == "glue":
        from transformers import DataCollatorWithPadding

        from ..data.glue import glue_task, load_glue_rows, tokenize_rows

        rows, columns = load_glue_rows(data, files, data.eval_split, None, 0, "eval data")
        if req.limit:
            rows = rows.select(range(min(req.limit, len(rows))))
        dataset = tokenize_rows(rows, glue_task(name), columns, data.label_column, tokenizer, 512)
        collate = DataCollatorWithPadding(tokenizer)
    else:
        from ..data.vision import VisionItems, collate_images, load_image_rows, transform_for

        rows, _ = load_image_rows(files, None if files else name, None, data.eval_split, data, None, 0, "eval data")
        if req.limit:
            rows = rows.select(range(min(req.limit, len(rows))))
        dataset, collate = VisionItems(rows, transform_for(model.config)), collate_images
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preds, refs = classify.predict(model.to(device), dataset, collate, req.batch_size, device)
    records = [{"idx": i, "prediction": p, "reference": r} for i, (p, r) in enumerate(zip(preds, refs))]
    return classify.score(family, name, preds, refs), records


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


def evaluate(req: EvalRequest) -> dict:
    """Run the evaluation, write scores and predictions, return the scores document."""
    if req.gguf_file and (req.adapter is not None or Path(req.gguf_file).name != req.gguf_file):
        raise GpartError("--gguf-file takes a file name inside the --model dir, for a base scored without --adapter "
                         "(an adapter's run records its own GGUF file)")
    family, name = parse_task(req.task)
    vllm_backend.check(req, family)
    if family == "generation":
        rows = load_task_rows(name, req.data, req.split, req.limit)
        if req.predictions is not None:
            scores, records = score_outputs(name, rows, _read_predictions(req.predictions, len(rows)))
        elif req.backend == "vllm":
            scores, records = vllm_backend.run_generation(req, name, rows)
        else:
            model, tokenizer = load_for_eval(req, "causal_lm")
            scores, records = run_generation(name, model, tokenizer, rows, req.batch_size, req.max_new_tokens)
    elif req.predictions is not None:
        raise GpartError("--predictions scores generated text; it applies to gsm8k, math and mawps")
    else:
        scores, records = _classification(req, family, name)
    output = req.output or Path(f"eval-{req.task.replace('/', '-')}.json")
    doc = {"task": req.task, "scores": scores, "adapter": str(req.adapter) if req.adapter else None,
           "model": req.model, "data": req.data, "limit": req.limit, "backend": req.backend,
           "predictions_file": str(output.with_suffix(".predictions.jsonl"))}
    atomic.write_text(output, json.dumps(doc, indent=2))
    atomic.write_text(output.with_suffix(".predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return doc
