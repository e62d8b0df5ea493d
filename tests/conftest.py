"""Shared fixtures: tiny in-process models built from transformers configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def tiny_llama(hidden: int = 32, layers: int = 2, vocab: int = 101, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_roberta(num_labels: int = 3, hidden: int = 32, seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
                        vocab_size=120, max_position_embeddings=64, num_labels=num_labels)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_vit(num_labels: int = 4, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=num_labels)
    return ViTForImageClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tokens():
    return torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(1))
