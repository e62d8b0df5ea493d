"""Experiment tracking (train.report_to): TensorBoard, wandb (offline) and MLflow (local file store) read back."""

import importlib.util
import json
import struct

import pytest
import yaml
from typer.testing import CliRunner

from gpart_cli.commands.app import app
from gpart_cli.errors import GpartError
from gpart_cli.recipe.schema import from_dict
from gpart_cli.train import tracking
from gpart_cli.train.run import run
from gpart_cli.train.trainer import Trainer
from tests.conftest import glue_recipe, interrupt_training_at

runner = CliRunner()


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file: a LevelDB-style log of 32 KiB blocks, each record
    split into chunks with a 7-byte header (checksum, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""  # after the file header ":W&B" + magic + version
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_records_become_train_dev_and_eval_metrics():
    assert tracking.metrics_of({"step": 3, "epoch": 0.5, "loss": 0.7, "lr": 1e-3, "grad_norm": 2.0,
                                "samples_per_s": 40.0}) == {"train/epoch": 0.5, "train/loss": 0.7, "train/lr": 1e-3,
                                                            "train/grad_norm": 2.0, "train/samples_per_s": 40.0}
    assert tracking.metrics_of({"step": 9, "dev": {"accuracy": 0.75, "f1": 0.5}}) == {"dev/accuracy": 0.75,
                                                                                     "dev/f1": 0.5}
    # strings and nested values are not metrics; booleans are not numbers here
    assert tracking.numbers({"accuracy": 1, "n": 40, "name": "x", "ok": True, "by": {"a": 1}}, "eval") == {
        "eval/accuracy": 1.0, "eval/n": 40.0}
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [2], "e": {}}


def test_report_to_is_validated_with_a_hint():
    base = {"model": {"name_or_path": "x"}}
    assert from_dict({**base, "train": {"report_to": "tensorboard"}}).train.report_to == ["tensorboard"]
    assert from_dict(base).train.report_to is None
    with pytest.raises(GpartError, match="'tensorbord' is not one of tensorboard, wandb, mlflow, none .*did you mean "
                                         "'tensorboard'"):
        from_dict({**base, "train": {"report_to": ["tensorbord"]}})
    assert tracking.backends(["none"]) == [] and tracking.backends(None) == []


def test_a_missing_tracker_library_is_named_with_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    recipe = tmp_path / "r.yaml"
    raw = {"model": {"name_or_path": "x"}, "train": {"report_to": ["tensorboard", "wandb"]}}
    recipe.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["train", str(recipe), "--output", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "train.report_to names wandb, which is not installed: pip install 'gpart[track]'" in res.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", None])  # None: MLflow 3's default, sqlite:///mlflow.db
def test_a_database_tracking_uri_with_mlflow_skinny_stops_before_anything_loads(monkeypatch, tmp_path, uri):
    pytest.importorskip("mlflow")
    if importlib.util.find_spec("sqlalchemy") is not None:
        pytest.skip("the full mlflow package is installed: a database store opens")
    monkeypatch.chdir(tmp_path)
    if uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "no/such-model"}, "train": {"report_to": ["mlflow"]}}))
    for extra in ([], ["--dry-run"]):
        res = runner.invoke(app, ["train", str(recipe), "--output", str(tmp_path / "run"), *extra])
        assert res.exit_code == 2
        named = f"MLFLOW_TRACKING_URI={uri}" if uri else (f"the tracking URI sqlite:///{tmp_path / 'mlflow.db'} "
                                                         f"(MLflow's default: MLFLOW_TRACKING_URI is unset)")
        assert (f"error: train.report_to mlflow: {named} cannot be opened: a database store needs the full MLflow "
                f"package: pip install mlflow (gpart[track] installs mlflow-skinny, which has none). Or set "
                f"MLFLOW_TRACKING_URI to a tracking server (http://HOST:5000), or remove mlflow from "
                f"train.report_to") in res.output
        assert "could not load model" not in res.output  # refused before the model was looked at
        assert not (tmp_path / "run").exists()


def test_a_tracking_uri_mlflow_cannot_open_is_named(monkeypatch, tmp_path):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://host/x")
    with pytest.raises(GpartError, match=r"train.report_to mlflow: MLFLOW_TRACKING_URI=bogus://host/x cannot be "
                                         r"opened: .*bogus.*Or set MLFLOW_TRACKING_URI to a tracking server"):
        tracking.check(["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # a server: nothing is contacted yet
    tracking.check(["mlflow"])


@pytest.mark.slow
def test_every_tracker_gets_every_metric_and_resume_continues_the_same_run(tiny_bert_dir, sst2_files, tmp_path,
                                                                            monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "gpart-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store in maintenance mode
    (tmp_path / "wandb").mkdir()
    recipe = glue_recipe(tiny_bert_dir, sst2_files, train__report_to=["tensorboard", "wandb", "mlflow"],
                         train__max_steps=12, train__eval_every=6)
    out = tmp_path / "run"
    original = interrupt_training_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, out)
    ids = json.loads((out / tracking.IDS_FILE).read_text())
    assert set(ids) == {"wandb", "mlflow"}
    client = MlflowClient()
    assert client.get_run(ids["mlflow"]).info.status == "KILLED"
    monkeypatch.setattr(Trainer, "_train_step", original)
    results = run(recipe, out, resume=True)
    assert json.loads((out / tracking.IDS_FILE).read_text()) == ids  # the same runs continued

    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in logs if "loss" in r}
    dev = {r["step"]: r["dev"] for r in logs if "dev" in r}
    assert sorted(train) == [3, 6, 9, 12] and sorted(dev) == [6, 12]
    expected = {"train/loss": {s: r["loss"] for s, r in train.items()},
                "train/lr": {s: r["lr"] for s, r in train.items()},
                "dev/accuracy": {s: d["accuracy"] for s, d in dev.items()},
                "eval/accuracy": {0: results["before"]["accuracy"], 12: results["after"]["accuracy"]}}

    # TensorBoard: the event files read back, across both sessions
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for name, series in expected.items():
        got = {e.step: e.value for e in events.Scalars(name)}
        assert got == pytest.approx(series, rel=1e-6), name  # stored as float32
    assert "train/grad_norm" in events.Tags()["scalars"] and "train/samples_per_s" in events.Tags()["scalars"]
    recipe_text = [t for t in events.Tags()["tensors"] if t.startswith("recipe")]
    assert len(recipe_text) == 1  # logged once, by the first session

    # MLflow: one run, finished, every point, the recipe as params and as an artifact
    run_info = client.get_run(ids["mlflow"])
    assert run_info.info.status == "FINISHED" and run_info.info.run_name == "t"
    assert run_info.data.params["method.d"] == "256" and run_info.data.params["train.report_to"] == \
        '["tensorboard", "wandb", "mlflow"]'
    experiment = client.get_experiment_by_name("gpart-test")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    for name, series in expected.items():
        assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], name)} == series, name
    assert [a.path for a in client.list_artifacts(ids["mlflow"])] == ["recipe.yaml"]

    # wandb (offline): both sessions wrote to the same run id; the recipe went once, as the first one's config
    sessions = sorted((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(sessions) == 2
    history, configs = {}, []
    for session in sessions:
        for r in wandb_records(session):
            if r.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                for name, value in row.items():
                    history.setdefault(name, {})[row["_step"]] = value
            elif r.WhichOneof("record_type") == "run":
                assert r.run.run_id == ids["wandb"]
                configs.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in r.run.config.update})
    for name, series in expected.items():
        assert history[name] == series, name
    assert configs[0]["method"]["d"] == 256 and "method" not in configs[1]


def test_tensorboard_resume_drops_points_past_the_checkpoint_and_logs_the_recipe_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = {"name": "r", "method": {"d": 8}}
    first = tracking.start(["tensorboard"], tmp_path, recipe, None)
    for step, loss in ((3, 1.0), (6, 0.5), (9, 0.25)):  # step 9 was logged after the last checkpoint (6)
        first.log({"step": step, "loss": loss})
    first.close("KILLED")
    second = tracking.start(["tensorboard"], tmp_path, recipe, 6)  # --resume from step 6
    for step, loss in ((9, 0.75), (12, 0.125)):
        second.log({"step": step, "loss": loss})
    second.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == {3: 1.0, 6: 0.5, 9: 0.75, 12: 0.125}
    assert [t for t in events.Tags()["tensors"] if t.startswith("recipe")] == ["recipe/text_summary"]
    assert len(events.Tensors("recipe/text_summary")) == 1
    assert json.loads((tmp_path / tracking.IDS_FILE).read_text()) == {}
