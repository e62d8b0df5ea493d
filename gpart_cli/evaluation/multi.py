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


def _alone(req, ref: AdapterRef) -> str:
    """The command that scores one adapter by itself."""
    return f"gpart eval --task {req.task} --adapter {ref.given}" + (f" --model {req.model}" if req.model else "")


class SharedBase:
    """A `load` for `runner.evaluate` that loads the base once and swaps each later adapter into it."""

    def __init__(self) -> None:
        self.model = self.source = self.weights = self.first = None
        self.loads = 0  # base models loaded (1 when every adapter shared the base)

    def __call__(self, req, ref: AdapterRef, task_type: str, device, precision):
        from ..core.swap import swap

        if self.model is None:
            self.model, self.source = load_scored(req, ref, task_type, device, precision)
            self.weights, self.loads, self.first = precision.weights, self.loads + 1, ref
            return self.model, self.source
        source = recorded_source(ref.base(req.model), ref.recipe, precision.weights, req.trust_remote_code)
        if source != self.source or precision.weights != self.weights:
            raise GpartError(f"--adapter {ref.given} needs another base load ({source.name_or_path}, "
                             f"{precision.weights}) than the first adapter ({self.source.name_or_path}, "
                             f"{self.weights}); score it in a command of its own: {_alone(req, ref)} (or pass "
                             f"--dtype when only the precision differs)")
        differences = self.first.artifact.spec.diff(ref.artifact.spec, self.first.given, ref.given)
        if differences:
            raise GpartError(f"--adapter {ref.given}: its partition differs from the first adapter's "
                             f"({'; '.join(str(d) for d in differences)}), so its θ cannot be swapped into the base "
                             f"loaded for that one; score it in a command of its own: {_alone(req, ref)}")
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
                             f"swapping θ, which takes .gpart adapters (or gpart run dirs holding one); score it in a "
                             f"command of its own: {_alone(req, ref)}")
    taken = set()
    labels = [_label(ref.path, taken) for ref in adapters]
    output, outputs = _outputs(req, adapters, labels)
    shared, docs = SharedBase(), []
    for ref, label, each_output in zip(adapters, labels, outputs):
        each = dataclasses.replace(req, adapter=ref, output=each_output)
        docs.append({"adapter": ref.given, "label": label, "output": str(each.output),
                     **{k: v for k, v in evaluate(each, load=shared).items() if k == "scores"}})
    summary = {"task": req.task, "base_loads": shared.loads, "adapters": docs, "output": str(output)}
    atomic.write_text(output, json.dumps(summary, indent=2))
    return summary


def _outputs(req, adapters: list[AdapterRef], labels: list[str]) -> tuple[Path, list[Path]]:
    """(the summary JSON, each adapter's scores JSON). With --output: the summary there, each adapter's beside it as
    OUTPUT.LABEL.json; without: each adapter's where its own `gpart eval` puts it (`runner.scores_path`), and the
    summary as eval-TASK.summary.json in the folder they share."""
    from .runner import scores_path

    if req.output is not None:
        output = scores_path(req)
        return output, [output.with_name(f"{output.stem}.{label}.json") for label in labels]
    outputs = [scores_path(dataclasses.replace(req, adapter=ref)) for ref in adapters]
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
