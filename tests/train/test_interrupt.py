"""Ctrl-C and SIGTERM stop `gpart train` at a step boundary, and the run resumes bit for bit (issue 30, item 1).

The runs are 18 steps of 2 micro-batches on a tiny BERT whose dropout draws from torch's generator; evaluations on
the dev split at steps 9 and 18. Each interrupted run is resumed with the command it printed and compared with the
uninterrupted one: θ, head, best step, scores, every metrics.jsonl record and every prediction.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.commands.app import app
from gpart_cli.train import trainer as trainer_module
from gpart_cli.train.interrupt import StopSignals
from gpart_cli.train.run import run
from gpart_cli.train.trainer import Trainer
from tests.conftest import glue_recipe

runner = CliRunner()
STEPS = 18  # 72 train rows, 4 per micro-batch, 2 micro-batches per step, 2 epochs


# ---- the handler ---------------------------------------------------------------------------------------------

def test_while_steps_run_a_signal_waits_for_the_boundary_and_a_second_ctrl_c_does_not():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stops = StopSignals()
    with stops:
        with stops.deferring():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # schedulers and torchrun repeat it: still the boundary
            assert stops.requested and stops.signum == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # outside the steps: at once
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_first_ctrl_c_outside_the_steps_stops_at_once():
    stops = StopSignals()
    with stops, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert stops.signum == signal.SIGINT and not stops.requested


# ---- interrupted runs against the uninterrupted one ----------------------------------------------------------

@pytest.fixture(scope="module")
def whole(tiny_bert_dir, sst2_files, tmp_path_factory):
    """(recipe file, the uninterrupted run dir)."""
    root = tmp_path_factory.mktemp("interrupt")
    recipe = root / "r.yaml"
    raw = glue_recipe(tiny_bert_dir, sst2_files, train__batch_size=4, train__grad_accum=2, train__log_every=1)
    recipe.write_text(yaml.safe_dump(raw.to_dict()))
    results = run(raw, root / "whole")
    assert results["steps"] == STEPS and results["best_step"] in (9, 18)
    return recipe, root / "whole"


def _records(run_dir):
    """metrics.jsonl without the throughput (a timing)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]


def assert_same_run(a, b):
    one, two = gpart.read_artifact(a / "adapter.gpart"), gpart.read_artifact(b / "adapter.gpart")
    assert torch.equal(one.theta, two.theta)
    assert sorted(one.head) == sorted(two.head) and all(torch.equal(one.head[k], two.head[k]) for k in one.head)
    results = [json.loads((d / "results.json").read_text()) for d in (a, b)]
    for key in ("steps", "best_step", "best_dev", "before", "after"):
        assert results[0][key] == results[1][key], key
    assert _records(a) == _records(b)
    assert (a / "predictions.jsonl").read_text() == (b / "predictions.jsonl").read_text()


def _send(signals):
    for signum in signals:
        os.kill(os.getpid(), signum)


def _signal_during(patch, where: str, step: int, signals):
    """Send `signals` to this process: inside training step `step` (counting from 1) after its first micro-batch's
    forward and backward drew dropout, inside the dev evaluation after step `step`, or while the result is saved."""
    sent = []

    def once():
        if not sent:
            sent.append(True)
            _send(signals)

    if where == "step":
        key = trainer_module.set_dropout_key

        def second_micro_batch(model, seed, micro):
            if micro == 2 * (step - 1) + 1:
                once()
            key(model, seed, micro)

        patch.setattr(trainer_module, "set_dropout_key", second_micro_batch)
    elif where == "dev eval":
        evaluate = Trainer.evaluate_split

        def dev_eval(self, dataset):
            if self.running_step == step:
                once()
            return evaluate(self, dataset)

        patch.setattr(Trainer, "evaluate_split", dev_eval)
    else:
        save = trainer_module.save_result

        def save_result(*args, **kwargs):
            once()
            return save(*args, **kwargs)

        patch.setattr(trainer_module, "save_result", save_result)


@pytest.mark.slow
@pytest.mark.parametrize("where,step,signals,saved,code", [
    ("step", 7, [signal.SIGINT], 7, 130),                  # Ctrl-C mid-step: the step finishes, saved at 7
    ("step", 5, [signal.SIGTERM], 5, 143),                 # what schedulers send
    ("dev eval", 9, [signal.SIGINT], 9, 130),              # the evaluation finishes and picks its best
    ("step", 12, [signal.SIGINT, signal.SIGINT], 9, 130),  # a second Ctrl-C: at once, from the last checkpoint
    ("end", STEPS, [signal.SIGTERM], STEPS, 143),          # while the result is saved: every step is done
])
def test_an_interrupted_run_resumes_bit_for_bit(whole, tmp_path, monkeypatch, where, step, signals, saved, code):
    recipe, whole_dir = whole
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch:
        _signal_during(patch, where, step, signals)
        res = runner.invoke(app, ["train", str(recipe), "--output", str(cut)])
    assert res.exit_code == code, res.output
    assert f"interrupted: checkpoint at step {saved}/{STEPS}. Resume with:" in res.output
    command = f"gpart train {cut / 'recipe.yaml'} --output {cut} --resume"
    assert f"  {command}" in res.output.splitlines()  # on one line, unwrapped
    if len(signals) == 1 and where != "end":
        assert f"stopping after step {step}/{STEPS} (its dev evaluation and checkpoint included)" in res.output
    assert json.loads((cut / "checkpoints" / "last" / "state.json").read_text())["step"] == saved
    assert not (cut / "results.json").exists()

    res = runner.invoke(app, command.split()[1:])  # exactly the printed command
    assert res.exit_code == 0, res.output
    assert f"resuming {cut} at step {saved}/{STEPS}" in res.output
    assert_same_run(whole_dir, cut)


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_says_how_to_start_again(whole, tmp_path, monkeypatch):
    recipe, whole_dir = whole
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch:
        report = Trainer.evaluate_report
        patch.setattr(Trainer, "evaluate_report", lambda self: (_send([signal.SIGINT]), report(self))[1])
        res = runner.invoke(app, ["train", str(recipe), "--output", str(cut)])
    assert res.exit_code == 130
    assert "interrupted before the first checkpoint: nothing to resume. Start again with:" in res.output
    command = f"gpart train {cut / 'recipe.yaml'} --output {cut}"
    assert f"  {command}" in res.output.splitlines()
    res = runner.invoke(app, command.split()[1:])
    assert res.exit_code == 0, res.output
    assert_same_run(whole_dir, cut)


# ---- a real signal from outside ------------------------------------------------------------------------------

# `gpart train ...` in a subprocess that holds micro-batch AT (mid-step) until the test has signalled it.
DRIVER = """
import sys, time
from pathlib import Path
from gpart_cli.commands.app import main
from gpart_cli.train import trainer

ready, at = Path(sys.argv[1]), int(sys.argv[2])
key = trainer.set_dropout_key

def hold(model, seed, micro):
    if micro == at and not hold.held:
        hold.held = True
        ready.touch()
        deadline = time.time() + 120
        while ready.exists() and time.time() < deadline:
            time.sleep(0.01)
    key(model, seed, micro)

hold.held = False
trainer.set_dropout_key = hold
sys.argv = ["gpart", *sys.argv[3:]]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_sent_to_the_process_mid_step(whole, tmp_path, signum, code):
    recipe, whole_dir = whole
    cut, ready = tmp_path / "cut", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ready), "9", "train", str(recipe), "--output",
                             str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "timed out"
    proc.send_signal(signum)  # inside step 5, between its two micro-batches
    ready.unlink()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert f"stopping after step 5/{STEPS}" in err and f"interrupted: checkpoint at step 5/{STEPS}" in err

    res = runner.invoke(app, ["train", str(cut / "recipe.yaml"), "--output", str(cut), "--resume"])
    assert res.exit_code == 0, res.output
    assert_same_run(whole_dir, cut)
