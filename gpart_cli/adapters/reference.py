"""One adapter reference (docs/design.md §5.1): whatever a command is given as an adapter is opened once, here.

An adapter can be named as a `.gpart` file, a gpart run dir, the authors' adapter dir (or either of its files), a
PEFT adapter dir (LoRA, Uni-LoRA, VeRA), a merged or full model dir, or `hf://user/name[@revision]` on the Hub.
`open_adapter` reads and validates it once into an `AdapterRef` (kind, path, the artifact or the authors' adapter,
the recipe and task its run recorded); `gpart eval`, `merge`, `inspect` and `convert` all work from that object, so
no command reads the file twice, and a wrong name fails here with what exists nearby.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.artifact import Artifact, load, read_artifact
from ..errors import GpartError
from . import authors_convert, authors_format, hub
from .devices import Precision
from .loading import ModelSource, infer_task_type, load_model, recorded_base, recorded_source
from .run_info import read_run_info

# Where a gpart run dir keeps its result (`recipe.methods.RESULTS`): the first that exists is the adapter.
RUN_RESULTS = (("adapter.gpart", "gpart"), ("adapter/adapter_config.json", "peft"), ("model/config.json", "merged"))


@dataclass(frozen=True)
class AdapterRef:
    """An opened adapter.

    kind: "gpart" (a .gpart file), "authors" (the authors' PEFT-fork format), "peft" (a PEFT adapter dir) or
        "merged" (a whole model dir: a merge, or a full / linear-probe run's model).
    path: the file or dir that holds it (a run dir is resolved to its result).
    given: what the user wrote, for messages.
    """

    kind: str
    path: Path
    given: str
    artifact: Artifact | None = None                       # kind gpart
    authors: authors_format.AuthorsAdapter | None = None   # kind authors
    run_info: dict = field(default_factory=dict)           # gpart_run.json beside a PEFT or merged result
    from_hub: bool = False                                 # fetched from the Hub into its cache

    @property
    def recipe(self) -> dict | None:
        """The resolved recipe the run trained with (None: the authors' adapters and foreign dirs record none)."""
        if self.artifact is not None:
            return self.artifact.meta.get("recipe") or None
        return self.run_info.get("recipe")

    @property
    def task(self) -> dict:
        """{type, name, num_labels, labels, ...} as the run recorded it ({} when nothing was recorded)."""
        if self.artifact is not None:
            return self.artifact.meta.get("task") or {}
        if self.authors is not None:
            return {"type": self.authors.task_type, "num_labels": self.authors.num_labels if self.authors.head
                    else None}
        return self.run_info.get("task") or {}

    @property
    def eval_task(self) -> str | None:
        """The `gpart eval --task` this run scores on: its recipe's eval.task, else the task it trained on."""
        recorded = ((self.recipe or {}).get("eval") or {}).get("task")
        name = self.task.get("name")
        return recorded or (name if name and not name.startswith("sft/") else None)

    @property
    def recorded_base(self) -> str | None:
        """The base model the adapter names (as the user wrote it when training), if any."""
        if self.artifact is not None:
            return (self.artifact.meta.get("base_model") or {}).get("name_or_path") or None
        if self.authors is not None:
            return self.authors.raw.get("base_model_name_or_path")
        recorded = ((self.recipe or {}).get("model") or {}).get("name_or_path")
        if recorded or self.kind != "peft":
            return recorded
        return json.loads((self.path / "adapter_config.json").read_text()).get("base_model_name_or_path")

    @property
    def run_dir(self) -> Path | None:
        """The gpart run dir the adapter belongs to (the folder holding its recipe.yaml), if any."""
        return next((d for d in (self.path, self.path.parent) if (d / "recipe.yaml").is_file()), None)

    def base(self, model: str | None) -> str:
        """`model` (--model), else the recorded base when it is a hub id or pkg: model (never a local path the
        adapter names: an adapter must not make gpart read files the user did not name)."""
        return model or recorded_base(self.recorded_base, self.path)

    def describe(self) -> str:
        return {"gpart": "a .gpart adapter", "authors": "an authors' GPart adapter", "peft": "a PEFT adapter",
                "merged": "a model dir"}[self.kind] + f" ({self.path})"


def open_adapter(text: str | os.PathLike, option: str = "--adapter") -> AdapterRef:
    """Open what `option` names as an adapter, reading and validating it once.

    Raises:
        GpartError: the path does not exist (with the nearest names that do), names nothing gpart reads, or holds
            an invalid adapter; a Hub adapter that cannot be fetched.
    """
    given = str(text)
    if hub.is_hub_ref(given):
        return dataclasses.replace(_open_local(hub.fetch(given, option), given, option), from_hub=True)
    path = Path(given).expanduser()
    if not path.exists():
        raise _no_such_path(given, path, option)
    return _open_local(path, given, option)


def _open_local(path: Path, given: str, option: str) -> AdapterRef:
    if authors_format.is_adapter(path):
        adapter = authors_format.read(path)
        return AdapterRef("authors", adapter.directory, given, authors=adapter)
    if path.is_file():
        return AdapterRef("gpart", path, given, artifact=read_artifact(path))
    return _open_dir(path, given, option)


def _open_dir(path: Path, given: str, option: str) -> AdapterRef:
    if (path / "adapter_config.json").is_file():
        return AdapterRef("peft", path, given, run_info=read_run_info(path))
    if (path / "config.json").is_file():
        return AdapterRef("merged", path, given, run_info=read_run_info(path))
    for name, kind in RUN_RESULTS:  # a gpart run dir
        if (path / name).is_file():
            result = path / name if kind == "gpart" else (path / name).parent
            if kind == "gpart":
                return AdapterRef(kind, result, given, artifact=read_artifact(result))
            return AdapterRef(kind, result, given, run_info=read_run_info(result))
    unfinished = (path / "checkpoints" / "last").is_dir()
    raise GpartError(f"{option} {given}: the directory holds no adapter" + (
        ": its run has not finished (it has checkpoints/last but no result yet); finish it with "
        f"`gpart train {path / 'recipe.yaml'} --output {path} --resume`" if unfinished else
        " (a .gpart file, a gpart run dir, a PEFT or authors' adapter dir, or a model dir with config.json)"))


def _no_such_path(given: str, path: Path, option: str) -> GpartError:
    """'no such file or directory', with the closest existing names where the path stops existing."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        path, parent = parent, parent.parent
    names = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
    near = difflib.get_close_matches(path.name, names, n=3, cutoff=0.5)
    where = "." if str(parent) in ("", ".") else str(parent)
    hint = (f"; did you mean {', '.join(str(Path(where) / n) if where != '.' else n for n in near)}?" if near
            else f"; {where} holds {', '.join(names[:8])}{' …' if len(names) > 8 else ''}" if names else "")
    return GpartError(f"{option} {given}: no such file or directory{hint} (an adapter on the Hub is written "
                      f"hf://user/name)")


def resolved_artifact(ref: AdapterRef, model: str | None = None, trust_remote_code: bool = False) -> Artifact:
    """The adapter as a `.gpart` artifact: the file itself, or an authors' adapter resolved on its base's config
    (`model`, else the base it records; no weights are read)."""
    if ref.kind == "gpart":
        return ref.artifact
    if ref.kind != "authors":
        raise GpartError(f"{ref.given} is {ref.describe()}, not a GPart adapter")
    base = ref.base(model)
    return authors_convert.to_artifact(ref.authors, authors_convert.meta_model(base, ref.authors, trust_remote_code),
                                       base)


def load_adapted(base: str, adapter: AdapterRef | str | os.PathLike, dtype: str = "float32",
                 trust_remote_code: bool = False, device: torch.device | None = None, task_type: str | None = None,
                 gguf_file: str | None = None):
    """Load `base` for the adapter's task onto `device` and apply the GPart adapter; returns (model, artifact,
    source).

    Merging and evaluation always load an unquantized copy: the recipe's quantization is not passed on. `adapter` is
    an opened `AdapterRef`, or a path opened here (a .gpart file, a run dir, or an authors' adapter). `gguf_file`
    (--gguf-file) names the GGUF file inside `base` in place of the one the run recorded.
    """
    ref = adapter if isinstance(adapter, AdapterRef) else open_adapter(adapter)
    if ref.kind == "authors":
        return authors_convert.load_adapted(base, ref.authors, dtype, trust_remote_code, device, task_type)
    art = resolved_artifact(ref)
    source = recorded_source(base, ref.recipe, dtype, trust_remote_code, gguf_file)
    task = ref.task
    model = load_model(source, task_type or task.get("type") or infer_task_type(source), task.get("num_labels"),
                       task.get("labels"), device)
    return load(model, art), art, source


def load_scored(req, ref: AdapterRef | None, task_type: str, device: torch.device, precision: Precision):
    """(model on `device` in `precision.weights`, the ModelSource its tokenizer/processor come from) for what
    `gpart eval` scores: the adapter `ref` (on --model or its recorded base), or the plain --model."""
    if ref is None:
        if not req.model:
            raise GpartError("give --model (a base or merged model) and/or --adapter")
        source = ModelSource(req.model, dtype=precision.weights, trust_remote_code=req.trust_remote_code,
                             gguf_file=req.gguf_file)
        return load_model(source, task_type, device=device), source
    if ref.kind in ("gpart", "authors"):
        model, _, source = load_adapted(ref.base(req.model), ref, precision.weights, req.trust_remote_code, device,
                                        task_type if ref.kind == "authors" else None, req.gguf_file)
        return model, source
    if ref.kind == "merged":
        source = recorded_source(str(ref.path), ref.recipe, precision.weights, req.trust_remote_code, req.gguf_file)
        return load_model(source, task_type, device=device), source
    from peft import PeftModel

    source = peft_base(req, ref, precision.weights)
    model = load_model(source, task_type, ref.task.get("num_labels"), ref.task.get("labels"), device)
    return PeftModel.from_pretrained(model, str(ref.path)), source


def peft_base(req, ref: AdapterRef, dtype: str) -> ModelSource:
    """The base a PEFT adapter applies to (--model, else the one its run or adapter_config.json records), in `dtype`."""
    return recorded_source(ref.base(req.model), ref.recipe, dtype, req.trust_remote_code, req.gguf_file)
