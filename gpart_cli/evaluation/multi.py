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
from ..adapters.reference import AdapterRef, load_scored
from ..errors import GpartError


def split_adapters(adapter: str | None) -> list[str] | None:
    """The adapters of a comma-separated --adapter value; None for a single one."""
    if adapter is None or "," not in adapter:
        return None
    parts = [p.strip() for p in adapter.split(",") if p.strip()]
    if len(parts) < 2:
        raise GpartError(f"--adapter {adapter}: list two or more adapters separated by commas, or one without")
    return parts


class SharedBase:
    """A `load` for `runner.evaluate` that loads the base once and swaps each later adapter into it."""

    def __init__(self) -> None:
        self.model = self.source = self.weights = None
        self.loads = 0  # base models loaded (1 when every adapter shared the base)

    def __call__(self, req, ref: AdapterRef, task_type: str, device, precision):
        from ..core.swap import swap

        if self.model is None:
            self.model, self.source = load_scored(req, ref, task_type, device, precision)
            self.weights, self.loads = precision.weights, self.loads + 1
            return self.model, self.source
        source = recorded_source(ref.base(req.model), ref.recipe, precision.weights, req.trust_remote_code)
        if source != self.source or precision.weights != self.weights:
            raise GpartError(f"--adapter {ref.given} needs another base load ({source.name_or_path}, "
                             f"{precision.weights}) than the first adapter ({self.source.name_or_path}, "
                             f"{self.weights}); score it with its own `gpart eval --adapter {ref.given}`, or pass "
                             f"--dtype when only the precision differs")
        return swap(self.model, ref.artifact), self.source


def _label(path: Path, taken: set[str]) -> str:
    """A short unique name for an adapter's output files: the file stem, or the run dir's name."""
    name = path.parent.name if path.name == "adapter.gpart" else path.stem
    label, k = name, 2
    while label in taken:
        label, k = f"{name}-{k}", k + 1
    taken.add(label)
    return label


def evaluate_many(req, adapters: list[AdapterRef]) -> dict:
    """Score every adapter (each opened before the base loads) on `req.task` with one base load; returns the
    summary (also written as JSON)."""
    from .runner import evaluate

    if req.backend != "hf":
        raise GpartError("--adapter with several adapters runs on --backend hf (vLLM loads each merged model itself)")
    for ref in adapters:
        if ref.kind != "gpart":
            raise GpartError(f"--adapter {ref.given} is {ref.describe()}: several adapters are scored on one base by "
                             f"swapping θ, which takes .gpart adapters (or gpart run dirs holding one); score it with "
                             f"its own `gpart eval --adapter {ref.given}`")
    output = req.output or Path(f"eval-{req.task.replace('/', '-')}.json")
    shared, taken, docs = SharedBase(), set(), []
    for ref in adapters:
        label = _label(ref.path, taken)
        each = dataclasses.replace(req, adapter=ref, output=output.with_name(f"{output.stem}.{label}.json"))
        docs.append({"adapter": ref.given, "label": label, "output": str(each.output),
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
