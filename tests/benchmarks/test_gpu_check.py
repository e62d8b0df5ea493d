"""benchmarks/gpu_check.py: the GPU smoke run users start first; on this CPU machine it runs the CPU path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(module, capsys, *args) -> tuple[int, dict, str]:
    code = module.main(list(args))
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_cpu_run_trains_evaluates_merges_and_says_what_it_skipped(capsys, tmp_path):
    module = _module()
    calls = []

    @module.register_check("extra")
    def extra(ctx):  # the hook other GPU checks (Triton, vLLM) plug into
        calls.append(sorted(ctx))
        return {"skipped": "no vLLM here"} if not ctx["cuda"] else {"ok": True}

    code, report, err = _run(module, capsys, "--device", "cpu", "--steps", "2", "--work", str(tmp_path))
    assert code == 0 and report["ok"]
    train, evaluated, merged = (report["checks"][k] for k in ("train", "eval", "merge"))
    assert (train["device"], train["weights"], train["autocast"], train["steps"], train["theta_dtype"]) == \
        ("cpu", "float32", None, 2, "float32")
    assert train["dev_loss"] > 0 and train["peak_gpu_mib"] is None
    assert (evaluated["device"], evaluated["weights"], evaluated["max_new_tokens"], evaluated["batch_size"],
            evaluated["scores"]["n"]) == ("cpu", "float32", 16, 4, 8)
    assert (merged["rope_theta"], merged["dtype"], merged["max_logit_diff_vs_adapter"]) == (1e6, "float32", 0.0)
    assert calls == [["cuda", "device", "merged_dir", "model_dir", "run_dir", "test_file", "train_file", "work"]]
    assert report["checks"]["extra"] == {"skipped": "no vLLM here"}
    assert report["checks"]["multi_gpu_fsdp_tied"] == {
        "skipped": "needs 2 CUDA GPUs (gloo runs of the same code: tests/train/test_fsdp_placement.py)"}
    assert any("bf16" in s for s in report["skipped"]) and "extra: no vLLM here" in report["skipped"]
    assert "skipped: bf16 weights and autocast on a GPU" in err and "train: ok" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the CPU run above is its twin")
def test_cuda_run_trains_in_bf16_on_the_gpu(capsys, tmp_path):
    code, report, _ = _run(_module(), capsys, "--steps", "2", "--work", str(tmp_path))
    assert code == 0 and report["ok"]
    train = report["checks"]["train"]
    assert train["device"].startswith("cuda") and (train["weights"], train["autocast"]) == ("bfloat16", "bfloat16")
    assert train["peak_gpu_mib"] > 0 and report["checks"]["eval"]["weights"] == "bfloat16"
