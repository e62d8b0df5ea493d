"""Experiment tracking: what metrics.jsonl records, also sent to TensorBoard, Weights & Biases and MLflow.

`train.report_to: [tensorboard, wandb, mlflow]` (default: none; metrics.jsonl is always written). Each backend is its
own library, imported only when named. Only rank 0 reports. A new tracker run logs the resolved recipe once; every
metrics.jsonl record follows under `train/...` and `dev/...`, and the eval split's scores under `eval/...` at step 0
(before training) and at the last step (after).

`--resume` continues the same run: the wandb and MLflow run ids are kept in the run dir (`tracking.json`), and
TensorBoard reopens RUN/tensorboard with `purge_step` just past the resumed step, so the steps a killed run logged after its
last checkpoint are dropped there as they are from metrics.jsonl. (wandb keeps them: it ignores steps it has seen.)

Where the records go follows each library's own settings: WANDB_PROJECT (default "gpart"), WANDB_MODE, WANDB_DIR
(default: the run dir); MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME (default "gpart").
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import yaml

from .. import atomic
from ..errors import GpartError, first_line

REPORT_TO = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "tracking.json"
INSTALL = "pip install 'gpart[track]'"
_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_SETTINGS = {"tensorboard": "the run dir must be writable", "wandb": "WANDB_MODE, WANDB_PROJECT, `wandb login`",
             "mlflow": "MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME"}


def backends(report_to: list | None) -> list[str]:
    """The backends a recipe's train.report_to names ("none" and an empty list: none)."""
    return [b for b in (report_to or []) if b != "none"]


def check(report_to: list | None) -> None:
    """Fail before anything is loaded when a named backend's library is not installed, or (MLflow) its tracking URI
    names a store it cannot open."""
    missing = [b for b in backends(report_to) if importlib.util.find_spec(_MODULE[b]) is None]
    if missing:
        raise GpartError(f"train.report_to names {', '.join(missing)}, which is not installed: {INSTALL} "
                         f"(or pip install {' '.join(missing)}), or remove it from train.report_to")
    if "mlflow" in backends(report_to):
        _check_mlflow_store()


_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's database stores (SQLAlchemy URIs)


def _check_mlflow_store() -> None:
    """The store MLFLOW_TRACKING_URI (or MLflow's default) names opens: a client is made, nothing is logged. A
    database URI with mlflow-skinny, which gpart[track] installs, fails here and not after the model has loaded."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow.get_tracking_uri()
    named = (f"MLFLOW_TRACKING_URI={uri}" if os.environ.get("MLFLOW_TRACKING_URI") else
             f"the tracking URI {uri} (MLflow's default: MLFLOW_TRACKING_URI is unset)")
    try:
        MlflowClient()
    except Exception as e:  # MLflow raises its own exception types and ImportErrors for a store it cannot open
        scheme = uri.split(":", 1)[0].split("+", 1)[0]
        if scheme in _DATABASES and importlib.util.find_spec("sqlalchemy") is None:
            why = ("a database store needs the full MLflow package: pip install mlflow (gpart[track] installs "
                   "mlflow-skinny, which has none)")
        else:
            why = first_line(e)
        raise GpartError(f"train.report_to mlflow: {named} cannot be opened: {why}. Or set MLFLOW_TRACKING_URI to "
                         f"a tracking server (http://HOST:5000), or remove mlflow from train.report_to") from None


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested recipe sections as the flat parameters trackers show."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def numbers(values: dict | None, prefix: str) -> dict[str, float]:
    """The numeric entries of a metrics mapping, named `prefix/key` (strings and nested values are left out)."""
    return {f"{prefix}/{k}": float(v) for k, v in (values or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metrics_of(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker metrics: {"step", "loss", ...} -> train/loss, {"dev": {...}} -> dev/..."""
    if "dev" in record:
        return numbers(record["dev"], "dev")
    return numbers({k: v for k, v in record.items() if k != "step"}, "train")


class _TensorBoard:
    def __init__(self, out: Path, recipe: dict, resume_step: int | None, ids: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        fresh = not (out / "tensorboard").is_dir()  # a tracker first named on a --resume logs the recipe too
        # Points past the checkpoint (logged before a kill) are dropped; the checkpoint's own step was done and stays.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)
        if fresh:
            self.writer.add_text("recipe", "```yaml\n" + yaml.safe_dump(recipe, sort_keys=False) + "```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, recipe: dict, resume_step: int | None, ids: dict) -> None:
        import wandb

        resumed = {"id": ids["wandb"], "resume": "allow"} if ids.get("wandb") else {}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gpart"), name=recipe.get("name"),
                              dir=os.environ.get("WANDB_DIR") or str(out),
                              config=None if resumed else recipe, **resumed)
        ids["wandb"] = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class _MLflow:
    def __init__(self, out: Path, recipe: dict, resume_step: int | None, ids: dict) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI decides where
        if ids.get("mlflow"):
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "gpart")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=recipe.get("name")).info.run_id
            ids["mlflow"] = self.run_id
            self._log_recipe(recipe)

    def _log_recipe(self, recipe: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                  for k, v in flatten(recipe).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, recipe, "recipe.yaml")

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Tracking:
    """The trackers of one run (none when train.report_to is empty, and off rank 0)."""

    def __init__(self, trackers: list | None = None) -> None:
        self.trackers = trackers or []

    def log(self, record: dict) -> None:
        """Send one metrics.jsonl record."""
        self._send(metrics_of(record), record["step"])

    def scores(self, scores: dict | None, step: int) -> None:
        """Send the eval split's scores (before training at step 0, after it at the last step)."""
        self._send(numbers(scores, "eval"), step)

    def _send(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            for tracker in self.trackers:
                tracker.log(metrics, step)

    def close(self, status: str = "FINISHED") -> None:
        """End every run with `status` (FINISHED | FAILED | KILLED); safe to call more than once."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(status)


def start(report_to: list | None, out: Path, recipe: dict, resume_step: int | None) -> Tracking:
    """Open the named trackers for the run in `out`; `resume_step` is the step a --resume starts from (None: a new
    run). The run ids are written to out/tracking.json for the next --resume."""
    names = backends(report_to)
    if not names:
        return Tracking()
    check(names)
    path = Path(out) / IDS_FILE
    ids = json.loads(path.read_text()) if resume_step is not None and path.is_file() else {}
    opened = Tracking()
    for name in names:
        try:
            opened.trackers.append(_BACKENDS[name](Path(out), recipe, resume_step, ids))
        except Exception as e:  # a tracker's own settings (URI, project, login): say which, not a traceback
            opened.close("FAILED")
            raise GpartError(f"train.report_to {name}: could not start the run ({first_line(e)}); fix its settings "
                             f"({_SETTINGS[name]}) or remove {name} from train.report_to") from None
    atomic.write_text(path, json.dumps(ids, indent=2))
    return opened
