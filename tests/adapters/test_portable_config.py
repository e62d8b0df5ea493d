"""Merged models that transformers 4.x and vLLM read right: top-level rope_theta, rope_scaling,
torch_dtype beside transformers 5's rope_parameters / dtype."""

from __future__ import annotations

import copy
import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.adapters.merged_dir import legacy_rope_fields, make_portable
from gpart_cli.commands.app import app

runner = CliRunner()
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}


def _qwen2_run(tmp_path, **config):
    """A saved tiny Qwen2 base (rope_theta 1e6, as Qwen2.5) and a GPart adapter with a non-zero theta."""
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                        max_position_embeddings=1024, rope_theta=1e6, **config))
    base.save_pretrained(tmp_path / "base")
    model = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=32, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(32, generator=torch.Generator().manual_seed(1)))
    gpart.save(model, tmp_path / "a.gpart")
    return model.eval(), tmp_path / "base", tmp_path / "a.gpart"


def _merge(tmp_path, base, adapter, *extra):
    res = runner.invoke(app, ["merge", str(base), str(adapter), "-o", str(tmp_path / "merged"), *extra])
    assert res.exit_code == 0, res.output
    return tmp_path / "merged"


def test_merged_qwen2_config_reads_right_both_ways(tmp_path):
    model, base, adapter = _qwen2_run(tmp_path)
    merged = _merge(tmp_path, base, adapter, "--dtype", "bfloat16")
    raw = json.loads((merged / "config.json").read_text())
    # As transformers 4.x and vLLM read it: the top-level keys.
    assert raw["rope_theta"] == 1e6 and raw["torch_dtype"] == "bfloat16" and "rope_scaling" not in raw
    # As the installed transformers reads it: the same RoPE, and a model that loads with the merged weights.
    config = AutoConfig.from_pretrained(merged)
    assert config.rope_parameters == {"rope_theta": 1e6, "rope_type": "default"}
    loaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert loaded.dtype == torch.bfloat16
    tokens = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.float()(tokens).logits, model(tokens).logits, rtol=0, atol=5e-2)


def test_rope_scaling_is_carried_where_the_base_had_it(tmp_path):
    _, base, adapter = _qwen2_run(tmp_path, rope_scaling=dict(YARN))
    merged = _merge(tmp_path, base, adapter)
    raw = json.loads((merged / "config.json").read_text())
    assert raw["rope_theta"] == 1e6 and raw["torch_dtype"] == "float32"
    assert raw["rope_scaling"] == {**YARN, "type": "yarn"}      # 4.x reads "rope_type", older readers "type"
    reread = AutoConfig.from_pretrained(merged).rope_parameters
    assert {k: reread[k] for k in ("rope_type", "factor", "original_max_position_embeddings", "rope_theta")} == \
        {**YARN, "rope_theta": 1e6}


def test_nested_rope_parameters_map_to_gemma3s_legacy_keys():
    nested = {"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert legacy_rope_fields(nested) == {"rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                          "rope_scaling": {"rope_type": "linear", "type": "linear", "factor": 8.0}}
    other = {"model_type": "someone", "rope_parameters": nested["rope_parameters"]}
    assert "rope_scaling" not in legacy_rope_fields(other)  # its v5 loader would replace the nested dict with it


def test_keys_already_there_are_kept_and_old_configs_pass_through():
    v4 = {"rope_theta": 5e5, "rope_scaling": None, "torch_dtype": "bfloat16"}
    assert make_portable(v4, "float32") == v4
    assert make_portable({"dtype": "float16"}, "float32") == {"dtype": "float16", "torch_dtype": "float16"}
    assert make_portable({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "rope_theta": 2.0},
                         "float32")["rope_theta"] == 2.0


def test_a_bf16_release_merges_in_bf16_with_one_rounding(tmp_path):
    """Loading a bf16 checkpoint in bf16 (half the memory of fp32) gives the same bits as an fp32 merge then a cast:
    GPart sums W0 + ΔW in fp32 and rounds once either way."""
    from safetensors.torch import load_file

    from gpart_cli.adapters.loading import ModelSource
    from gpart_cli.adapters.merged_dir import merge_load_dtype, merge_to_dir

    _, base, adapter = _qwen2_run(tmp_path)
    bf16_base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(bf16_base)
    assert merge_load_dtype(ModelSource(str(bf16_base)), "bfloat16") == "bfloat16"
    assert merge_load_dtype(ModelSource(str(base)), "bfloat16") == "float32"      # fp32 checkpoint: merge in fp32, cast
    merge_to_dir(str(bf16_base), adapter, tmp_path / "direct", "bfloat16")
    reference = gpart.load(AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.float32), adapter)
    expected = gpart.merge(reference).to(torch.bfloat16).state_dict()
    got = load_file(str(tmp_path / "direct" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in got and set(got) <= set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)
