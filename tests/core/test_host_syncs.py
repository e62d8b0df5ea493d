"""What the GPU paths must not do on the host: decode through unmerged layers, sync the host per
micro-batch, copy per row per decode step. Counted on the CPU, where the same code runs."""

import sys

import pytest
import torch

import gpart_cli as gpart
from gpart_cli.core.model import GPartLinear, merged_for_decoding
from gpart_cli.kernels.delta_ops import LayerGroups
from tests.conftest import glue_recipe, tiny_gpt2, tiny_llama

HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__iter__")


@pytest.fixture
def host_reads(monkeypatch):
    """Every call that brings a tensor's values to the host, as (caller file, caller function)."""
    calls = []

    def spy(name, original):
        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            calls.append((frame.f_code.co_filename, frame.f_code.co_name, name))
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    return calls


@pytest.mark.slow
def test_a_training_step_reads_the_device_once(tiny_bert_dir, sst2_files, tmp_path, host_reads):
    from gpart_cli.train.trainer import Trainer

    recipe = glue_recipe(tiny_bert_dir, sst2_files, train__grad_accum=3, train__max_steps=3, method__dropout=0.1)
    trainer = Trainer(recipe, tmp_path, device="cpu")
    trainer.setup()
    trainer._train_step(0)  # builds the layers' group-id caches (on the host on the CPU path, once)
    del host_reads[:]
    results = [trainer._train_step(step) for step in (1, 2)]
    # the epoch permutation is host data, not a read of the device
    ours = [c[1:] for c in host_reads if "gpart_cli" in c[0] and c[1] != "micro_batch_rows"]
    assert ours == [("_train_step", "tolist")] * 2  # one per optimizer step, none per micro-batch
    assert all(isinstance(v, float) and v > 0 for loss_norm in results for v in loss_norm)


def test_the_stop_check_copies_once_per_decode_step(tiny_llama_dir, host_reads):
    from transformers import AutoTokenizer

    from gpart_cli.evaluation.generate import MATH_STOPS, _stopping_criteria

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    stop = tok("\n\n### Instruction", add_special_tokens=False)["input_ids"]
    prompt, n = [5, 6, 7, 8], len(stop) + 2
    ids = torch.tensor([prompt + [30, 31] + stop,                  # a stop string just completed
                        prompt + [30] * (n - 1) + [tok.eos_token_id],  # eos
                        prompt + [30] * n, prompt + [31] * n])     # still going
    criteria = _stopping_criteria(tok, len(prompt), {tok.eos_token_id}, MATH_STOPS)
    del host_reads[:]
    done = criteria(ids, None)
    reads = list(host_reads)
    assert [c[2] for c in reads] == ["tolist"]  # one copy of every row's tail, not one per row
    assert done.tolist() == [True, True, False, False]
    del host_reads[:]
    assert criteria(ids[:, :len(prompt)], None).tolist() == [False] * 4 and len(host_reads) == 1  # nothing new yet


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_merged_gives_the_same_logits_and_training_gets_w0_back(dtype, tokens, monkeypatch):
    config = gpart.GPartConfig(d=64, target_modules=("q_proj", "v_proj", "down_proj"))
    model = gpart.apply(tiny_llama().to(dtype), config)
    with torch.no_grad():
        gpart.theta(model).normal_(generator=torch.Generator().manual_seed(0))
    w0 = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(input_ids=tokens).logits
    builds, original = [], LayerGroups.build
    monkeypatch.setattr(LayerGroups, "build", lambda self, *a, **k: builds.append(1) or original(self, *a, **k))
    with merged_for_decoding(model):
        assert not any(isinstance(m, GPartLinear) for m in model.modules())
        del builds[:]
        with torch.no_grad():
            merged = model(input_ids=tokens).logits
        assert builds == []  # no W_eff built per call
    assert torch.equal(merged, unmerged)  # bit for bit
    assert sum(isinstance(m, GPartLinear) for m in model.modules()) == 6
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())  # W0 exactly, θ untouched
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()  # trains through the GPart layers again
    assert gpart.theta(model).grad.abs().sum() > 0


@pytest.mark.parametrize("keep_ids", [False, True])
def test_decoding_merged_frees_the_id_caches_unless_asked_to_keep_them(tokens, keep_ids):
    # GRPO decodes every step: keep_ids spares the CPU path rebuilding every layer's group ids each step.
    model = gpart.apply(tiny_llama(), gpart.GPartConfig(d=64, target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        gpart.theta(model).normal_(generator=torch.Generator().manual_seed(0))
        unmerged = model(input_ids=tokens).logits  # builds (and caches) the ids on the CPU
    layers = [m for m in model.modules() if isinstance(m, GPartLinear)]
    cached = [layer.groups.state_bytes() for layer in layers]
    assert all(b > 0 for b in cached)
    with torch.no_grad(), merged_for_decoding(model, keep_ids=keep_ids):
        merged = model(input_ids=tokens).logits
    assert torch.equal(merged, unmerged)
    assert [layer.groups.state_bytes() for layer in layers] == (cached if keep_ids else [0] * len(layers))


def test_conv1d_layers_decode_merged_too(tokens):
    model = gpart.apply(tiny_gpt2(), gpart.GPartConfig(d=64, target_modules=("c_attn",), bias=True))
    with torch.no_grad():
        gpart.theta(model).normal_(generator=torch.Generator().manual_seed(0))
        unmerged = model(input_ids=tokens).logits
        with merged_for_decoding(model):
            merged = model(input_ids=tokens).logits
    torch.testing.assert_close(merged, unmerged)  # addmm instead of linear: equal to rounding
    assert sum(isinstance(m, GPartLinear) for m in model.modules()) == 2


def test_gpart_eval_decodes_an_adapter_merged(monkeypatch, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from gpart_cli.adapters.reference import open_adapter
    from gpart_cli.evaluation import tasks
    from gpart_cli.evaluation.runner import EvalRequest, evaluate
    from tests.conftest import ASSETS

    model = gpart.apply(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                        gpart.GPartConfig(d=32, target_modules=("q_proj",)))
    gpart.save(model, tmp_path / "a.gpart")
    decoded = []
    real = tasks.run_generation
    monkeypatch.setattr("gpart_cli.evaluation.runner.run_generation",
                        lambda name, m, *a, **k: decoded.append(any(isinstance(x, GPartLinear) for x in m.modules()))
                        or real(name, m, *a, **k))
    adapter = open_adapter(tmp_path / "a.gpart")
    doc = evaluate(EvalRequest(task="gsm8k", adapter=adapter, model=str(tiny_llama_dir), limit=2,
                               data=[str(ASSETS / "gsm8k" / "test.jsonl")], max_new_tokens=3, device="cpu",
                               output=tmp_path / "eval.json"))
    assert decoded == [False] and doc["scores"]["n"] == 2
