"""The vLLM weight push (docs/gpu.md): TRL's real `sync_weights` against a stand-in engine on the CPU. What the
engine receives must be what `gpart.merge` writes: the adapted weights only, under their checkpoint names, in the
engine's dtype."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import gpart_cli as gpart
from gpart_cli.train.vllm_sync import merged_weights, push_merged_weights
from tests.conftest import tiny_llama

trl = pytest.importorskip("trl")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class StandInEngine:
    """What TRL's colocate path calls on a vLLM `LLM`: model.load_weights([(name, tensor)]) and reset_prefix_cache."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.received: dict[str, torch.Tensor] = {}
        model = SimpleNamespace(load_weights=self.load_weights)
        runner = SimpleNamespace(model=model)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(dtype=dtype),
                                          model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
                                              model_runner=runner)))
        self.resets = 0

    def load_weights(self, weights):
        for name, tensor in weights:
            assert name not in self.received, f"{name} sent twice"
            self.received[name] = tensor.detach().clone()

    def reset_prefix_cache(self):
        self.resets += 1


def adapted_model(bias: bool = False):
    model = gpart.apply(tiny_llama(), gpart.GPartConfig(d=200, seed=4, target_modules=TARGETS, bias=bias))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.linspace(-0.3, 0.3, 200))
    return model


def generation_with(engine, mode: str = "colocate"):
    """TRL's VLLMGeneration without starting vLLM: the attributes its sync_weights reads."""
    from trl.generation.vllm_generation import VLLMGeneration

    generation = object.__new__(VLLMGeneration)
    generation.mode, generation.enable_sleep_mode, generation.llm = mode, False, engine
    generation.accelerator = SimpleNamespace(is_main_process=True)
    generation._weight_metadata = None
    return generation


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sync_sends_the_merged_adapted_weights_in_the_engine_dtype(dtype):
    model = adapted_model()
    expected = gpart.merge(copy.deepcopy(model)).state_dict()
    engine = StandInEngine(dtype)
    generation = generation_with(engine)
    push_merged_weights(generation, model)
    generation.sync_weights()  # TRL's own method, as GRPOTrainer calls it before a rollout
    adapted = [f"model.layers.{i}.self_attn.{t}.weight" for i in range(2) for t in TARGETS]
    assert sorted(engine.received) == sorted(adapted) and engine.resets == 1
    for name in adapted:
        got = engine.received[name]
        assert got.dtype == dtype and got.shape == expected[name].shape
        assert torch.equal(got, expected[name].to(dtype)), name
        assert not torch.equal(expected[name], tiny_llama().state_dict()[name])  # θ ≠ 0 moved it
    # The training model is untouched: still GPart layers, θ as it was.
    assert len([m for m in model.modules() if type(m).__name__ == "GPartLinear"]) == len(adapted)
    assert torch.equal(gpart.theta(model), torch.linspace(-0.3, 0.3, 200))


def test_adapted_biases_and_conv1d_weights_are_sent_as_merge_writes_them():
    from tests.conftest import tiny_gpt2

    model = gpart.apply(tiny_gpt2(), gpart.GPartConfig(d=50, seed=2, target_modules=("c_attn",), bias=True))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.linspace(-1, 1, 50))
    expected = gpart.merge(copy.deepcopy(model)).state_dict()
    sent = dict(merged_weights(model, torch.float32))
    assert sorted(sent) == sorted(f"transformer.h.{i}.attn.c_attn.{p}" for i in range(2) for p in ("weight", "bias"))
    assert all(torch.equal(t, expected[n]) for n, t in sent.items())


def test_server_mode_announces_then_streams_the_same_tensors():
    model = adapted_model()
    sent = {}

    class Client:
        def update_named_params(self, metadata, params):
            for (name, dtype, shape), (name2, tensor) in zip(metadata, params):
                assert name == name2 and list(tensor.shape) == shape and str(tensor.dtype).endswith(dtype)
                sent[name] = tensor

        def reset_prefix_cache(self):
            pass

    generation = generation_with(None, mode="server")
    generation.vllm_client = Client()
    push_merged_weights(generation, model)
    generation.sync_weights()
    expected = gpart.merge(copy.deepcopy(model)).state_dict()
    assert len(sent) == 8 and all(torch.equal(t, expected[n]) for n, t in sent.items())
