"""benchmarks/memory_estimate.py: its parameter counts are the real models', and docs/gpu.md's table is its output."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "benchmarks" / "memory_estimate.py")
memory_estimate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_estimate)


@pytest.mark.parametrize("name, config_class", [("Llama-3.1-8B", "LlamaConfig"), ("Llama-3.1-70B", "LlamaConfig"),
                                                ("Gemma-7B", "GemmaConfig")])
def test_parameter_counts_match_the_model_built_from_its_config(name, config_class):
    import transformers

    h, layers, inter, vocab, heads, kv_heads, head_dim, tied = memory_estimate.MODELS[name]
    config = getattr(transformers, config_class)(hidden_size=h, num_hidden_layers=layers, intermediate_size=inter,
                                                 vocab_size=vocab, num_attention_heads=heads,
                                                 num_key_value_heads=kv_heads, head_dim=head_dim,
                                                 tie_word_embeddings=tied)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    counts = memory_estimate.params(h, layers, inter, vocab, heads, kv_heads, head_dim, tied)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert counts["linear"] == linear


@pytest.mark.slow
def test_the_readme_table_is_the_scripts_output():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_estimate.py"), "--markdown"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() in (ROOT / "docs" / "gpu.md").read_text()
