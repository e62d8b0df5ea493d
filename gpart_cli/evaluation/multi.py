"""`gpart eval --adapter a.gpart,b.gpart,...`: several GPart adapters scored on one loaded base.

The base is loaded once, with the first adapter applied; every later adapter is swapped in (`gpart.swap` on the
unmerged model: θ and head replaced, nothing re-rounded), so each score is the one a separate `gpart eval` gives.
The adapters must share a base (same recorded loader options) and a partition; each writes its own scores JSON
(`eval-TASK.NAME.json`) and predictions, and a summary JSON lists them all.
"""

from __future__ import annotations

import dataclasses
import json
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


class SharedBase:
    """A `load` for `runner.evaluate` that loads the base once and swaps each later adapter into it."""

    def __init__(self) -> None:
        self.model = self.source = self.weights = None
        self.loads = 0  # base models loaded (1 when every adapter shared the base)

    def __call__(self, req, what: Scored, task_type: str, device, precision):
        from ..core.swap import swap

        if what.kind != "gpart":
            raise GpartError(f"--adapter {what.path}: several adapters are scored on one base by swapping θ, which "
                             f"takes .gpart adapters (or gpart run dirs holding one); score it on its own")
        if self.model is None:
            self.model, self.source = load_scored(req, what, task_type, device, precision)
            self.weights, self.loads = precision.weights, self.loads + 1
            return self.model, self.source
        source = self._source(req, what, precision.weights)
        if source != self.source or precision.weights != self.weights:
            raise GpartError(f"--adapter {what.path} needs another base load ({source.name_or_path}, "
                             f"{precision.weights}) than the first adapter ({self.source.name_or_path}, "
                             f"{self.weights}); score adapters of different bases or precisions separately, or pass "
                             f"--dtype")
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
    output = req.output or Path(f"eval-{req.task.replace('/', '-')}.json")
    shared, taken, docs = SharedBase(), set(), []
    for path in adapters:
        label = _label(path, taken)
        each = dataclasses.replace(req, adapter=path, output=output.with_name(f"{output.stem}.{label}.json"))
        docs.append({"adapter": str(path), "label": label, "output": str(each.output),
                     **{k: v for k, v in evaluate(each, load=shared).items() if k == "scores"}})
    summary = {"task": req.task, "base_loads": shared.loads, "adapters": docs}
    atomic.write_text(output, json.dumps(summary, indent=2))
    return summary


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
