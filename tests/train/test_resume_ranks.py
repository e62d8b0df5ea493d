"""--resume of a multi-process run draws the same dropout masks as the run that was not stopped: each rank's own
generator state is checkpointed and restored (2 gloo processes, the base model's dropout on)."""

from __future__ import annotations

import pytest
import torch
import yaml

import gpart_cli as gpart
from tests.conftest import glue_recipe
from tests.train.test_ddp import torchrun, torchrun_script

pytestmark = pytest.mark.slow

STOP = """
import sys
from gpart_cli.train.trainer import Trainer

original = Trainer._train_step
STOP = int(sys.argv.pop())  # the step to stop at, taken before the CLI reads its arguments


def stop(self, step):
    if step == STOP:
        raise RuntimeError("stopped by the test")  # not Ctrl-C: the checkpoint of the step before stays as it is
    return original(self, step)


Trainer._train_step = stop
from gpart_cli.commands.app import main

sys.argv[0] = "gpart"
main()
"""


def test_a_resumed_two_process_run_ends_on_the_theta_of_the_run_that_went_through(tiny_bert_dir, sst2_files,
                                                                                   tmp_path):
    # tiny_bert_dir keeps BERT's dropout (0.1): every rank draws masks from its own generator, a different stream on
    # each rank. Checkpoints at step 3 (save_every) and 6.
    cfg = glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=6, train__grad_accum=2, train__save_every=3,
                      train__eval_every=6, train__eval_before=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    torchrun(2, recipe, tmp_path / "through")
    stopped = torchrun_script(STOP, tmp_path / "stop.py", "train", recipe, "--output", tmp_path / "resumed", "3",
                              ok=False)
    assert stopped.returncode != 0 and "stopped by the test" in stopped.stderr, stopped.stderr[-3000:]
    assert (tmp_path / "resumed" / "checkpoints" / "last").resolve().name == "last-00000003"
    torchrun(2, recipe, tmp_path / "resumed", "--resume")
    through, resumed = (gpart.read_artifact(tmp_path / d / "adapter.gpart") for d in ("through", "resumed"))
    assert torch.count_nonzero(through.theta) > 0
    assert torch.equal(resumed.theta, through.theta)
