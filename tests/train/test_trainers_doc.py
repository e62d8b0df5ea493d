"""The example of docs/trainers.md runs as written, on a tiny Llama instead of SmolLM2 (and fewer steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import gpart_cli as gpart

DOC = Path(__file__).resolve().parents[2] / "docs" / "trainers.md"
pytest.importorskip("trl")


def example() -> str:
    return re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)


def test_the_documented_example_trains_saves_and_its_adapter_loads(tmp_path, tiny_llama_dir, monkeypatch):
    code = example()
    # The doc's only differences from this run: the model, a d that fits it, and fewer steps.
    for old, new in (('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(tiny_llama_dir))), ("d=16_384", "d=64"),
                     ("max_steps=100, save_steps=50", "max_steps=2, save_steps=1, use_cpu=True, report_to='none'")):
        assert old in code
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    for step in (1, 2):
        files = {p.name for p in (tmp_path / "out" / f"checkpoint-{step}").iterdir()}
        assert {"adapter.gpart", "optimizer.pt", "trainer_state.json"} <= files and "model.safetensors" not in files
    art = gpart.read_artifact(tmp_path / "out" / "final" / "adapter.gpart")
    assert torch.equal(art.theta, gpart.theta(scope["model"]).detach().cpu()) and art.theta.abs().sum() > 0
    from transformers import AutoModelForCausalLM

    loaded = gpart.load(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), art)
    assert torch.equal(gpart.theta(loaded), art.theta)
