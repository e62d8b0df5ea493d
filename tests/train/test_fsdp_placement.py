"""Where FSDP puts the weights (train/fsdp.py; docs/gpu.md, "FSDP: where the weights go"), 2 gloo processes each:
every rank ends with exactly the tensors of a single-process load (weights, their dtypes, and the non-persistent
buffers no checkpoint holds), and ranks but 0 never hold more than their share. Models the other FSDP runs do not
build: tied input/output embeddings, a bf16 checkpoint, text classification, the authors' splitmix64-mod-v1 partition.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gpart_cli.recipe.schema import from_dict
from tests.conftest import ASSETS, tiny_qwen2
from tests.train.test_ddp import assert_same_adapter, single, torchrun, torchrun_script

pytestmark = pytest.mark.slow
GSM = ASSETS / "gsm8k"


def qwen2_dir(tokenizer_dir, out, dtype=torch.float32):
    """tiny_qwen2 (tied embeddings) in `dtype`, saved with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_qwen2(vocab=len(tokenizer)).to(dtype)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 0, 1, 1
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sft_recipe(model_dir, path, *, dtype="float32", partition="feistel-v1", seed=0):
    raw = {"model": {"name_or_path": str(model_dir), "dtype": dtype},
           "method": {"name": "gpart", "d": 96, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                      "partition": partition, "seed": seed},
           "data": {"family": "sft", "task": "gsm8k", "train_files": [str(GSM / "train.jsonl")],
                    "query_column": "question", "response_column": "answer", "max_train_samples": 22,
                    "dev_samples": 4, "max_length": 320},
           "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "lr_theta": 1e-2, "eval_before": False,
                     "log_every": 1, "eval_every": 2, "distributed": "fsdp"},
           "name": "placement"}
    path.write_text(yaml.safe_dump(from_dict(raw).to_dict()))
    return path


PLACEMENT = """
import json, os, sys
import torch
import torch.distributed as dist
import torch.distributed.fsdp as torch_fsdp
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from gpart_cli.recipe.methods import prepare
from gpart_cli.recipe.schema import load_recipe
from gpart_cli.train import fsdp
from gpart_cli.train.setup import build
from gpart_cli.train.trainer import Trainer


def local_bytes(model):
    # parameter bytes this rank holds: its shards of the sharded ones, whole replicated ones, nothing for meta
    total = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += 0 if t.is_meta else t.numel() * t.element_size()
    return total


seen = []
real_shard, real_fully_shard = fsdp.shard, torch_fsdp.fully_shard


def shard(model, *args):
    seen.append(local_bytes(model))  # as the trainer hands it over
    def fully_shard(module, **kwargs):
        out = real_fully_shard(module, **kwargs)
        seen.append(local_bytes(model))  # after each unit
        return out
    torch_fsdp.fully_shard = fully_shard
    try:
        return real_shard(model, *args)
    finally:
        torch_fsdp.fully_shard = real_fully_shard


fsdp.shard = shard
recipe, out = load_recipe(sys.argv[1]), sys.argv[2]
trainer = Trainer(recipe, out)
trainer.setup()
world, rank = dist.get_world_size(), dist.get_rank()
keep = fsdp.replicated(trainer.model)
share = sum(-(-p.shape[0] // world) * p[0].numel() * p.element_size()
            for p in trainer.model.parameters() if p not in keep)
replicated = sum(p.numel() * p.element_size() for p in keep)
# Every rank holds exactly the weights of a plain single-process load, in its dtypes.
torch.manual_seed(recipe.train.seed)
alone = build(recipe)
want = prepare(alone.model, recipe.method, recipe.train, alone.task_type).model
got = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in trainer.model.state_dict().items()}
same = sorted(want.state_dict()) == sorted(got) and all(got[k].dtype == v.dtype and torch.equal(got[k], v)
                                                        for k, v in want.state_dict().items())
full = sum(p.numel() * p.element_size() for p in want.parameters())
# The buffers no state dict holds: this rank's, and (rank 0) the single-process model's, for the test to compare.
save_file(fsdp.non_persistent_buffers(trainer.model), f"{out}-buffers-{rank}.safetensors")
if rank == 0:
    save_file(fsdp.non_persistent_buffers(want), f"{out}-buffers-alone.safetensors")
dtypes = sorted({str(p.dtype) for p in trainer.model.parameters() if p not in keep})
os.write(1, (json.dumps({"rank": rank, "seen": seen, "after": local_bytes(trainer.model), "share": share,
                         "replicated": replicated, "same": same, "full": full, "dtypes": dtypes}) + "\\n").encode())
trainer.release()
dist.destroy_process_group()
"""


def placement(recipe, tmp_path) -> list[dict]:
    """Set `recipe` up on 2 gloo ranks: each rank's record (see PLACEMENT), in rank order."""
    res = torchrun_script(PLACEMENT, tmp_path / "placement.py", recipe, tmp_path / "run")
    ranks = sorted((json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    return ranks


def assert_placed_as_one_process_loads(ranks, tmp_path):
    for r in ranks:
        assert r["same"]  # rank 0's weights in rank 0's dtypes, gathered from the shards
        assert r["share"] < r["full"] / 2 + 4096  # shards of dim 0: half the base, up to an odd row each
        assert r["after"] <= r["share"] + r["replicated"]
    # Rank 1 never held a weight of the base: a skeleton, then its shards.
    assert ranks[1]["seen"][0] <= ranks[1]["replicated"]
    assert max(ranks[1]["seen"]) <= ranks[1]["share"] + ranks[1]["replicated"]
    assert ranks[0]["seen"][0] >= ranks[0]["full"]  # rank 0 loaded the checkpoint (on the CPU) to broadcast it
    # Every non-persistent buffer (computed at init, in no checkpoint): the single-process model's, bit for bit.
    alone = load_file(str(tmp_path / "run-buffers-alone.safetensors"))
    assert alone
    for rank in (0, 1):
        mine = load_file(str(tmp_path / f"run-buffers-{rank}.safetensors"))
        assert sorted(mine) == sorted(alone)
        for name, value in alone.items():
            assert mine[name].dtype == value.dtype and torch.equal(mine[name], value), (rank, name)


def test_fsdp_ranks_never_hold_more_than_their_share_of_the_base(tiny_llama_dir, tmp_path):
    """Rank 0 loads on the CPU; the other ranks build on the meta device and receive only their shards."""
    ranks = placement(sft_recipe(tiny_llama_dir, tmp_path / "r.yaml"), tmp_path)
    assert_placed_as_one_process_loads(ranks, tmp_path)
    assert [r["dtypes"] for r in ranks] == [["torch.float32"]] * 2


def test_a_tied_bf16_model_is_placed_as_one_process_loads_it(tiny_llama_dir, tmp_path):
    # One tensor for the input and output embeddings: one FSDP unit on every rank. In bf16 with the authors'
    # partition, whose seeds may be >= 2**63.
    model = qwen2_dir(tiny_llama_dir, tmp_path / "qwen", torch.bfloat16)
    recipe = sft_recipe(model, tmp_path / "r.yaml", dtype="bfloat16", partition="splitmix64-mod-v1", seed=2**63 + 11)
    ranks = placement(recipe, tmp_path)
    assert_placed_as_one_process_loads(ranks, tmp_path)
    assert [r["dtypes"] for r in ranks] == [["torch.bfloat16"]] * 2


def test_text_classification_is_placed_like_the_other_families(tiny_bert_dir, tmp_path):
    from tests.data.test_text_classification import support_rows, write_csv

    raw = {"model": {"name_or_path": str(tiny_bert_dir)},
           "method": {"name": "gpart", "d": 64, "target_modules": ["query", "value"]},
           "data": {"family": "text_classification", "task": "support",
                    "train_files": [str(write_csv(tmp_path / "train.csv", support_rows(12)))],
                    "text_columns": ["message"], "label_column": "topic", "max_length": 24, "dev_fraction": 0.25},
           "train": {"max_steps": 1, "batch_size": 4, "eval_before": False, "distributed": "fsdp"}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(from_dict(raw).to_dict()))
    assert_placed_as_one_process_loads(placement(recipe, tmp_path), tmp_path)


def test_fsdp_on_a_tied_model_trains_the_theta_of_one_process(tiny_llama_dir, tmp_path):
    # Qwen2.5-0.5B/3B, Gemma and SmolLM2 tie their embeddings; the authors' partition, a seed >= 2**63.
    model = qwen2_dir(tiny_llama_dir, tmp_path / "qwen")
    recipe = sft_recipe(model, tmp_path / "r.yaml", partition="splitmix64-mod-v1", seed=2**63 + 11)
    single(recipe, tmp_path / "one")
    err = torchrun(2, recipe, tmp_path / "two")
    assert "× 2 processes (fsdp)" in err
    assert_same_adapter(tmp_path / "two", tmp_path / "one")


MISMATCH = """
import os
import torch
import gpart_cli as gpart
from gpart_cli.errors import GpartError
from gpart_cli.train import distributed, fsdp
from tests.conftest import tiny_qwen2

rank, _ = distributed.world()
# What transformers 5 + accelerate gave FSDP before: rank 0 tied (from_pretrained), the skeletons untied.
model = gpart.apply(tiny_qwen2(tied=rank == 0), gpart.GPartConfig(d=16, target_modules=("q_proj",)))
try:
    fsdp.shard(model, torch.device("cpu"))
    os.write(1, f"{rank} sharded\\n".encode())
except GpartError as e:
    os.write(1, f"{rank} {e}\\n".encode())
distributed.shutdown()
"""


def test_ranks_that_would_shard_different_units_raise_instead_of_hanging(tmp_path):
    res = torchrun_script(MISMATCH, tmp_path / "mismatch.py")
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    fix = ("Every rank must build the same model: give every node the same model files and the same torch and "
           "transformers versions, or use train.distributed: ddp")
    assert lines == {
        "0": "train.distributed: fsdp: ranks [1] would shard the model differently from rank 0 (see the message of "
             f"those ranks). {fix}",
        "1": "train.distributed: fsdp: ranks [1] would shard the model differently from rank 0 (rank 0 has 'unit "
             "(root): model.embed_tokens.weight [101, 32] float32, model.norm.weight [32] float32', rank 1 has 'unit "
             f"model.embed_tokens: model.embed_tokens.weight [101, 32] float32'). {fix}"}


DTYPE_AUTO = """
import json, os, sys
import torch
from gpart_cli.adapters.loading import ModelSource, load_model, load_skeleton
from gpart_cli.train import distributed, fsdp

rank, _ = distributed.world()
source = ModelSource(sys.argv[1], dtype="auto")  # the dtype the checkpoint is stored in
model = load_model(source, "causal_lm") if rank == 0 else load_skeleton(source, "causal_lm")
fsdp.match_rank0(model)
dtypes = sorted({str(p.dtype) for p in model.parameters()})
os.write(1, (json.dumps({"rank": rank, "dtypes": dtypes, "meta": all(p.is_meta for p in model.parameters())})
             + "\\n").encode())
distributed.shutdown()
"""


def test_a_dtype_only_rank_0_can_read_reaches_every_rank(tiny_llama_dir, tmp_path):
    # dtype "auto" with a config that records no dtype (older checkpoints): from_pretrained on rank 0 takes the
    # weights' dtype, which a skeleton built from the config cannot know; rank 0 hands it over.
    model = qwen2_dir(tiny_llama_dir, tmp_path / "qwen", torch.bfloat16)
    config = json.loads((model / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (model / "config.json").write_text(json.dumps(config))
    res = torchrun_script(DTYPE_AUTO, tmp_path / "dtype_auto.py", model)
    ranks = sorted((json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert ranks == [{"rank": 0, "dtypes": ["torch.bfloat16"], "meta": False},
                     {"rank": 1, "dtypes": ["torch.bfloat16"], "meta": True}]
