"""FSDP2 wrapping of GPart models, in-process on a one-rank gloo group (the multi-process runs are in test_ddp.py)."""

import re
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gpart_cli as gpart
from gpart_cli.core.layer import GPartLinear
from gpart_cli.errors import GpartError
from gpart_cli.train import fsdp
from tests.conftest import tiny_gpt2, tiny_llama, tiny_qwen2, tiny_roberta, tiny_vit


@pytest.fixture
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _gpart_llama(seed=0):
    model = tiny_llama(seed=seed)
    return gpart.apply(model, gpart.GPartConfig(d=64, seed=3, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))


def test_blocks_are_the_repeated_layers_of_each_family():
    assert [type(b).__name__ for b in fsdp.blocks(tiny_llama())] == ["LlamaDecoderLayer"] * 2
    assert [type(b).__name__ for b in fsdp.blocks(tiny_roberta())] == ["RobertaLayer"] * 2
    assert [type(b).__name__ for b in fsdp.blocks(tiny_vit())] == ["ViTLayer"] * 2
    assert [type(b).__name__ for b in fsdp.blocks(tiny_gpt2())] == ["GPT2Block"] * 2


def test_theta_and_heads_stay_whole_the_frozen_base_is_sharded(group):
    model = gpart.apply(tiny_roberta(), gpart.GPartConfig(d=64, target_modules=("query", "value"),
                                                          head_modules=("classifier",)))
    fsdp.shard(model, torch.device("cpu"))
    kinds = {name: type(p.data).__name__ for name, p in model.named_parameters()}
    assert kinds["gpart_state.theta"] == "Tensor" and type(gpart.theta(model)) is nn.Parameter
    assert all(kinds[n] == "Tensor" for n in kinds if n.startswith("classifier."))
    assert kinds["roberta.encoder.layer.0.attention.self.query.base_layer.weight"] == "DTensor"
    assert kinds["roberta.embeddings.word_embeddings.weight"] == "DTensor"
    assert {n for n, k in kinds.items() if k == "Tensor"} == {"gpart_state.theta", "classifier.dense.weight",
                                                               "classifier.dense.bias", "classifier.out_proj.weight",
                                                               "classifier.out_proj.bias"}


def test_sharded_forward_and_backward_match_the_plain_model(group, tokens):
    plain, sharded = _gpart_llama(), _gpart_llama()
    with torch.no_grad():
        gpart.theta(plain).normal_(generator=torch.Generator().manual_seed(0))
        gpart.theta(sharded).copy_(gpart.theta(plain))
    fsdp.shard(sharded, torch.device("cpu"))
    for model in (plain, sharded):
        model.train()
        model(input_ids=tokens, labels=tokens).loss.backward()
    torch.testing.assert_close(gpart.theta(sharded).grad, gpart.theta(plain).grad, rtol=1e-5, atol=1e-7)
    plain.eval(), sharded.eval()
    with torch.no_grad():
        torch.testing.assert_close(sharded(input_ids=tokens).logits, plain(input_ids=tokens).logits)
    # An eval forward builds W_eff from the gathered weight; nothing of it may outlive the forward.
    layers = [m for m in sharded.modules() if isinstance(m, GPartLinear)]
    assert len(layers) == 8  # 2 blocks x q, k, v, o
    assert [k for m in layers for k, v in vars(m).items() if isinstance(v, torch.Tensor)] == []


def test_untied_embeddings_get_their_own_units_tied_ones_stay_with_the_root():
    untied = tiny_llama()
    assert fsdp._embeddings(untied) == [untied.get_input_embeddings(), untied.get_output_embeddings()]
    tied = tiny_gpt2()
    assert fsdp._embeddings(tied) == []


def test_methods_that_save_every_weight_are_refused(group):
    with pytest.raises(GpartError, match="does not support method 'full'.*train.distributed: ddp"):
        fsdp.shard(tiny_llama(), torch.device("cpu"), "full")


def test_a_model_without_repeated_blocks_is_refused(group):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(GpartError, match="found no transformer blocks in Sequential"):
        fsdp.shard(model, torch.device("cpu"), "gpart")


def test_quantized_base_weights_stay_whole_the_rest_is_sharded(group, tmp_path, tokens):
    from gpart_cli.adapters.loading import ModelSource, load_model

    tiny_llama().save_pretrained(tmp_path)
    model = load_model(ModelSource(str(tmp_path), quantization="int8"), "causal_lm")
    model = gpart.apply(model, gpart.GPartConfig(d=64, target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        want = model(input_ids=tokens).logits
    fsdp.shard(model, torch.device("cpu"))
    kinds = {name: type(p).__name__ for name, p in model.named_parameters()}
    assert kinds["model.layers.0.self_attn.q_proj.base_layer.weight"] == "Int8Params"  # bitsandbytes, whole
    assert kinds["model.layers.0.self_attn.k_proj.weight"] == "Int8Params"
    assert kinds["model.layers.0.input_layernorm.weight"] == "DTensor" and kinds["lm_head.weight"] == "DTensor"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, want)


def test_the_recipe_field_is_validated():
    from gpart_cli.recipe.schema import from_dict

    base = {"model": {"name_or_path": "m"}}
    assert from_dict({**base, "train": {"distributed": "fsdp"}}).train.distributed == "fsdp"
    assert from_dict(base).train.distributed == "ddp"
    with pytest.raises(GpartError, match="train.distributed = 'fsd' is not one of ddp, fsdp.*did you mean 'fsdp'"):
        from_dict({**base, "train": {"distributed": "fsd"}})


@pytest.mark.parametrize("version", ["2.4.1+cu121", "2.6.0"])
def test_fsdp_refuses_a_torch_without_ignored_params(version):
    with pytest.raises(GpartError, match=rf"fsdp needs torch>=2\.7 .*torch {re.escape(version)} is installed"):
        fsdp.check_torch(version)


@pytest.mark.parametrize("version", ["2.7.0", "2.13.0+cpu", torch.__version__])
def test_fsdp_accepts_torch_2_7_and_later(version):
    fsdp.check_torch(version)


def test_a_skeleton_is_the_loaded_model_without_its_weights(tmp_path):
    """What FSDP ranks but 0 build: load_model's parameters on the meta device, its buffers real and equal."""
    from gpart_cli.adapters.loading import ModelSource, load_model, load_skeleton

    tiny_llama().save_pretrained(tmp_path)
    source = ModelSource(str(tmp_path))
    loaded, skeleton = load_model(source, "causal_lm"), load_skeleton(source, "causal_lm")
    assert type(skeleton) is type(loaded)
    assert {n: (p.shape, p.dtype) for n, p in skeleton.named_parameters()} == \
        {n: (p.shape, p.dtype) for n, p in loaded.named_parameters()}
    assert all(p.is_meta for p in skeleton.parameters())
    buffers = dict(loaded.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in skeleton.named_buffers())


def test_the_process_group_gets_a_timeout_long_enough_for_rank_0_alone(monkeypatch):
    from datetime import timedelta

    from gpart_cli.train import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert distributed.world() == (1, 2) and calls == [{"timeout": timedelta(hours=1)}]
    monkeypatch.setenv("GPART_DIST_TIMEOUT", "7200")
    assert distributed.timeout() == timedelta(hours=2)
    monkeypatch.setenv("GPART_DIST_TIMEOUT", "2h")
    with pytest.raises(GpartError, match="GPART_DIST_TIMEOUT='2h': give the collective timeout in whole seconds"):
        distributed.timeout()


def test_a_tied_skeleton_is_tied_and_in_eval_mode_as_from_pretrained_returns_it(tmp_path):
    """accelerate's init_empty_weights re-registers every parameter, which unties tied embeddings (transformers 5):
    ranks but 0 would then shard embed_tokens and lm_head as two FSDP units where rank 0 has one."""
    from gpart_cli.adapters.loading import ModelSource, load_model, load_skeleton

    tiny_qwen2().save_pretrained(tmp_path)
    source = ModelSource(str(tmp_path))
    loaded, skeleton = load_model(source, "causal_lm"), load_skeleton(source, "causal_lm")
    assert skeleton.get_input_embeddings().weight is skeleton.get_output_embeddings().weight
    assert (skeleton.training, loaded.training) == (False, False)
    assert {n: (p.shape, p.dtype) for n, p in skeleton.named_parameters()} == \
        {n: (p.shape, p.dtype) for n, p in loaded.named_parameters()}
    plans = [fsdp.plan(m, fsdp.blocks(m) + fsdp._embeddings(m), set()) for m in (loaded, skeleton)]
    assert plans[0] == plans[1]
    assert plans[0][-2] == "unit (root): model.embed_tokens.weight [101, 32] float32, model.norm.weight [32] float32"
