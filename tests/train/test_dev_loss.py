"""The SFT dev loss: chunked over the vocabulary, equal to transformers' loss, bounded in memory."""

from __future__ import annotations

import copy

import pytest
import torch

import gpart_cli as gpart
from gpart_cli.train.dev_loss import ChunkedLoss, mean_dev_loss
from tests.peak_memory import PeakTensorBytes


def _batch(vocab: int, batch: int, length: int, prompt: int, seed: int = 0) -> dict:
    """Right-padded SFT batch: labels -100 on the prompt and the padding, like `SFTCollator`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask[-1, length - 5:], labels[-1, length - 5:] = 0, -100   # the last row is 5 tokens shorter
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _naive(model, batch: dict) -> float:
    """What the trainer computed before: transformers' own mean loss, weighted by labelled tokens."""
    with torch.no_grad():
        return float(model(**batch).loss)


def _llama(vocab: int, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        max_position_embeddings=1024, **extra)).eval()


def test_large_vocab_long_sequences_stay_within_the_chunk_bound():
    """64k vocabulary, 2 × 512 tokens: the naive loss holds B·T·V fp32 logits and a log-softmax of the same size;
    the chunked pass at most about 3 × chunk × V × 4 bytes (logits, log-softmax, one spare) plus hidden states."""
    vocab, batch_size, length, chunk = 64_000, 2, 512, 128
    model = _llama(vocab)
    batch = _batch(vocab, batch_size, length, prompt=256)
    bound = 3 * chunk * vocab * 4 + 8 * 2**20          # 98 MB + 8 MB slack (hidden states are 2·512·32·4 B)
    logits_bytes = batch_size * length * vocab * 4     # 262 MB
    with torch.no_grad(), PeakTensorBytes() as naive_peak:
        naive = float(model(**batch).loss)
    with torch.no_grad(), PeakTensorBytes() as chunked_peak:
        total, count = ChunkedLoss(model, chunk)(batch)
    assert naive_peak.peak >= 2 * logits_bytes > bound  # logits + log-softmax, both whole-batch
    assert chunked_peak.peak <= bound
    assert count == int((batch["labels"][:, 1:] != -100).sum()) == 2 * 256 - 5
    assert float(total) / count == pytest.approx(naive, rel=1e-5)


def test_mean_over_batches_weights_by_labelled_tokens():
    model = _llama(300)
    batches = [_batch(300, 3, 40, prompt=10, seed=1), _batch(300, 2, 24, prompt=20, seed=2)]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    expected = sum(_naive(model, b) * n for b, n in zip(batches, counts)) / sum(counts)
    model.train()
    assert mean_dev_loss(model, batches, chunk=7) == pytest.approx(expected, rel=1e-5)
    assert model.training  # the mode the caller had is restored


def _qwen2(vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        tie_word_embeddings=True, rope_theta=1e6)).eval()


def _gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=64)).eval()


def _gemma2(vocab: int):
    """Gemma 2 soft-caps its logits: cap · tanh(logits / cap); a small cap makes the difference visible."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           vocab_size=vocab, final_logit_softcapping=0.5)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits far beyond the cap
    return model


def _gpart(vocab: int):
    model = gpart.apply(_llama(vocab), gpart.GPartConfig(d=64, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(64, generator=torch.Generator().manual_seed(3)))
    return model.eval()


def _lora(vocab: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(vocab), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("build", [_qwen2, _gpt2, _gemma2, _gpart, _lora],
                         ids=["qwen2-tied", "gpt2", "gemma2-softcap", "gpart", "peft-lora"])
def test_chunked_equals_naive_across_architectures(build):
    model = build(97)
    batch = _batch(97, 3, 20, prompt=6, seed=4)
    loss_fn = ChunkedLoss(model, chunk=5)
    with torch.no_grad():
        total, count = loss_fn(batch)
    assert loss_fn.chunked  # the probe reproduced the model's own logits: the chunked path ran
    assert float(total) / count == pytest.approx(_naive(model, batch), rel=1e-5)


def test_a_head_it_cannot_reproduce_is_scored_per_sequence(capsys):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    base = _llama(97)

    class Tripled(type(base)):
        """A causal LM whose forward triples the head's logits (an unknown post-processing)."""

        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            logits = out.logits * 3
            loss = None
            if labels is not None:
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                         labels[:, 1:].flatten(), ignore_index=-100)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    model = Tripled(base.config).eval()
    model.load_state_dict(copy.deepcopy(base.state_dict()))
    batch = _batch(97, 3, 20, prompt=6, seed=5)
    counts = [int((batch["labels"][i, 1:] != -100).sum()) for i in range(3)]
    expected = sum(_naive(model, {k: v[i:i + 1] for k, v in batch.items()}) * counts[i] for i in range(3))
    loss_fn = ChunkedLoss(model, chunk=5)
    with torch.no_grad():
        total, count = loss_fn(batch)
    assert not loss_fn.chunked and count == sum(counts)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert "one sequence per forward" in capsys.readouterr().err
