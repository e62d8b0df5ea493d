"""`gpart eval --adapter a.gpart,b.gpart,...`: several GPart adapters scored on one loaded base.

The base is loaded once, with the first adapter applied; every later adapter is swapped in (`gpart.swap` on the
unmerged model: θ and head replaced, nothing re-rounded), so each score is the one a separate `gpart eval` gives.
The adapters must share a base (same recorded loader options) and a partition (an adapter that does not is named,
with the command that scores it by itself); each writes its own scores JSON and predictions where its own `gpart
eval` would (or beside --output, `OUTPUT.NAME.json`), and a summary JSON lists them all.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from rich.table import Table

from .. import atomic
from ..adapters.loading import recorded_source
from ..adapters.reference import Scored, load_scored, recorded_base, scored
from ..errors import GpartError


def split_adapters(adapter: Path | str | None) -> list[Path] | None:
    """The adapters of a comma-separated --adapter value; None for a single one."""
    if adapter is None or "," not in str(adapter):
        return None
    parts = [Path(p.strip()) for p in str(adapter).split(",") if p.strip()]
    if len(parts) < 2:
        raise GpartError(f"--adapter {adapter}: list two or more adapters separated by commas, or one without")
    return parts


# What two adapters must share for one's θ to be swapped into a base that holds the other's: their partition.
_PARTITION = ("targets", "n_params", "d", "seed", "isometric", "partition")


def _alone(req, path: Path) -> str:
    """The command that scores one adapter by itself."""
    return f"gpart eval --task {req.task} --adapter {path}" + (f" --model {req.model}" if req.model else "")


class SharedBase:
    """A `load` for `runner.evaluate` that loads the base once and swaps each later adapter into it."""

    def __init__(self) -> None:
        self.model = self.source = self.weights = self.first = None
        self.loads = 0  # base models loaded (1 when every adapter shared the base)

    def __call__(self, req, what: Scored, task_type: str, device, precision):
        from ..core.swap import swap

        if what.kind != "gpart":
            raise GpartError(f"--adapter {what.path}: several adapters are scored on one base by swapping θ, which "
                             f"takes .gpart adapters (or gpart run dirs holding one); score it in a command of its "
                             f"own: {_alone(req, what.path)}")
        from ..core.artifact import read_artifact

        if self.model is None:
            self.model, self.source = load_scored(req, what, task_type, device, precision)
            self.weights, self.loads = precision.weights, self.loads + 1
            self.first = read_artifact(what.path).meta
            return self.model, self.source
        source = self._source(req, what, precision.weights)
        if source != self.source or precision.weights != self.weights:
            raise GpartError(f"--adapter {what.path} needs another base load ({source.name_or_path}, "
                             f"{precision.weights}) than the first adapter ({self.source.name_or_path}, "
                             f"{self.weights}); score it in a command of its own: {_alone(req, what.path)} (or pass "
                             f"--dtype when only the precision differs)")
        meta = read_artifact(what.path).meta
        differs = [k for k in _PARTITION if meta.get(k) != self.first.get(k)]
        if differs:
            raise GpartError(f"--adapter {what.path}: its partition differs from the first adapter's "
                             f"({', '.join(differs)}), so its θ cannot be swapped into the base loaded for that one; "
                             f"score it in a command of its own: {_alone(req, what.path)}")
        return swap(self.model, what.path), self.source

    @staticmethod
    def _source(req, what: Scored, weights: str):
        from ..core.artifact import read_artifact

        recorded = (read_artifact(what.path).meta.get("base_model") or {}).get("name_or_path")
        base = req.model or recorded_base(recorded, what.path)
        return recorded_source(base, what.recipe, weights, req.trust_remote_code)


def _label(path: Path, taken: set[str]) -> str:
    """A short unique name for an adapter's output files: the file stem, or the run dir's name."""
    name = path.name if path.is_dir() else (path.parent.name if path.name == "adapter.gpart" else path.stem)
    label, k = name, 2
    while label in taken:
        label, k = f"{name}-{k}", k + 1
    taken.add(label)
    return label


def evaluate_many(req, adapters: list[Path]) -> dict:
    """Score every adapter on `req.task` with one base load; returns the summary (also written as JSON)."""
    from .runner import evaluate

    if req.backend != "hf":
        raise GpartError("--adapter with several adapters runs on --backend hf (vLLM loads each merged model itself)")
    for path in adapters:
        scored(path)  # every adapter readable before the base is loaded
    taken = set()
    labels = [_label(path, taken) for path in adapters]
    output, outputs = _outputs(req, adapters, labels)
    shared, docs = SharedBase(), []
    for path, label, each_output in zip(adapters, labels, outputs):
        each = dataclasses.replace(req, adapter=path, output=each_output)
        docs.append({"adapter": str(path), "label": label, "output": str(each.output),
                     **{k: v for k, v in evaluate(each, load=shared).items() if k == "scores"}})
    summary = {"task": req.task, "base_loads": shared.loads, "adapters": docs, "output": str(output)}
    atomic.write_text(output, json.dumps(summary, indent=2))
    return summary


def _outputs(req, adapters: list[Path], labels: list[str]) -> tuple[Path, list[Path]]:
    """(the summary JSON, each adapter's scores JSON). With --output: the summary there, each adapter's beside it as
    OUTPUT.LABEL.json; without: each adapter's where its own `gpart eval` puts it (`runner.scores_path`), and the
    summary as eval-TASK.summary.json in the folder they share."""
    from .runner import scores_path

    if req.output is not None:
        output = scores_path(req)
        return output, [output.with_name(f"{output.stem}.{label}.json") for label in labels]
    outputs = [scores_path(dataclasses.replace(req, adapter=path)) for path in adapters]
    shared = Path(os.path.commonpath([str(p.parent.resolve()) for p in outputs]))
    return shared / f"eval-{req.task.replace('/', '-')}.summary.json", outputs


def summary_table(summary: dict) -> Table:
    table = Table(title=f"{summary['task']} · {len(summary['adapters'])} adapters · base loaded "
                        f"{summary['base_loads']}x")
    keys = list(summary["adapters"][0]["scores"])
    table.add_column("adapter")
    for key in keys:
        table.add_column(key, justify="right")
    for doc in summary["adapters"]:
        table.add_row(doc["label"], *[f"{v:.4f}" if isinstance(v, float) else str(v)
                                      for v in (doc["scores"].get(k) for k in keys)])
    return table
