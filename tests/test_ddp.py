"""DDP on CPU (gloo): two processes with half the batch each end at the single-process θ (fp tolerance)."""

import socket
import subprocess
import sys

import pytest
import torch
import yaml

import gpart_cli as gpart
from tests.test_train_e2e import glue_recipe

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_dropout(model_dir, out):
    # Dropout masks come from each process's own RNG stream: with them the runs could not agree.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, hidden_dropout_prob=0.0,
                                                               attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_two_process_ddp_matches_single_process(tiny_bert_dir, sst2_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    model_dir = _without_dropout(tiny_bert_dir, tmp_path / "model")
    cfg = glue_recipe(model_dir, sst2_files, train__max_steps=6, train__eval_before=False, train__grad_accum=2)
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    single = subprocess.run([sys.executable, "-m", "gpart_cli", "train", str(recipe), "--output",
                             str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "gpart_cli", "train", str(recipe), "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = (gpart.read_artifact(tmp_path / d / "adapter.gpart") for d in ("one", "two"))
    assert torch.count_nonzero(one.theta) > 0
    torch.testing.assert_close(two.theta, one.theta, rtol=1e-4, atol=1e-6)
    for name in one.head:
        torch.testing.assert_close(two.head[name], one.head[name], rtol=1e-4, atol=1e-6)
    # Only rank 0 wrote: one metrics file with one line per logged step, one adapter.
    logs = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(logs) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())
