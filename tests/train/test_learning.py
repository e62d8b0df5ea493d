"""Tests that catch wrong math in training: the optimizer's parameter groups hold exactly the recipe's learning
rates and weight decay for exactly the right tensors, one step moves each trainable tensor by AdamW's update with
the recipe's lr and decay and a gradient computed here without the optimizer, and a run learns a tiny task that
only θ can learn."""

import json

import pytest
import torch

from gpart_cli.recipe.methods import METHODS
from gpart_cli.train.run import run
from gpart_cli.train.trainer import Trainer
from tests.conftest import glue_recipe, write_jsonl

LR_THETA, LR_HEAD, WD = 3e-3, 7e-4, 0.05
HEAD = ["classifier.weight", "classifier.bias"]  # the tiny BERT's 32 -> 2 head


def _trainer(tiny_bert_dir, sst2_files, tmp_path, method):
    recipe = glue_recipe(tiny_bert_dir, sst2_files, method__name=method, train__lr_theta=LR_THETA,
                         train__lr_head=LR_HEAD, train__weight_decay=WD, train__warmup_ratio=0.0,
                         train__eval_before=False)
    trainer = Trainer(recipe, tmp_path / "run", device="cpu")
    trainer.setup()
    return trainer


def _names(model, params) -> list[str]:
    ids = {id(p) for p in params}
    return [n.removeprefix("base_model.model.") for n, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parameter_groups_hold_the_recipe_values(tiny_bert_dir, sst2_files, tmp_path, method):
    t = _trainer(tiny_bert_dir, sst2_files, tmp_path, method)
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    expected = {"head": LR_HEAD} if method == "linear_probe" else {"adapter": LR_THETA, "head": LR_HEAD}
    assert {name: (g["lr"], g["initial_lr"], g["weight_decay"]) for name, g in groups.items()} == \
        {name: (lr, lr, WD) for name, lr in expected.items()}
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)  # every trainable tensor, once
    head = [n.replace("modules_to_save.default.", "") for n in _names(t.model, groups["head"]["params"])]
    assert head == HEAD
    if method == "gpart":
        assert _names(t.model, groups["adapter"]["params"]) == ["gpart_state.theta"]
    elif method != "linear_probe":
        adapter = _names(t.model, groups["adapter"]["params"])
        assert adapter and not any("classifier" in n for n in adapter)


def _role(name: str) -> str:
    """What a trainable tensor is, from its name (PEFT's prefixes removed): "head" or "adapter" (θ, LoRA's factors)."""
    plain = name.removeprefix("base_model.model.").replace("modules_to_save.default.", "")
    return "head" if plain in HEAD else "adapter"


def _gradient_without_the_optimizer(t) -> dict[str, torch.Tensor]:
    """Step 0's gradient of every trainable tensor, by name: forward and backward of the step's batches, then
    clipped to the recipe's max_grad_norm as torch.nn.utils.clip_grad_norm_ defines it."""
    for _, batch, weight in t.step_batches(0):
        (t.model(**batch).loss * weight / t.recipe.train.grad_accum).backward()
    grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.model.zero_grad(set_to_none=True)
    norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()])))
    clip = min(1.0, (t.recipe.train.max_grad_norm or float("inf")) / (norm + 1e-6))
    return {n: g * clip for n, g in grads.items()}


@pytest.mark.parametrize("method", ["gpart", "lora"])
def test_one_step_is_adamw_with_the_recipes_lr_and_decay(tiny_bert_dir, sst2_files, tmp_path, method):
    """After AdamW's first step m̂ = g and v̂ = g², so each trainable entry moves by exactly
    -lr·wd·p - lr·g/(|g| + eps): lr the recipe's lr_theta for the adapter (θ, LoRA's factors) and lr_head for the
    head, wd the recipe's weight decay, g computed here without the optimizer. Frozen tensors do not move."""
    t = _trainer(tiny_bert_dir, sst2_files, tmp_path, method)
    t.model.eval()  # no dropout: the step and the gradient above see the same function
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    grads = _gradient_without_the_optimizer(t)
    roles = {n: _role(n) for n in grads}
    assert list(roles.values()).count("head") == len(HEAD) and "adapter" in roles.values()
    t._train_step(0)
    for name, p in t.model.named_parameters():
        if name not in grads:
            assert torch.equal(p.detach(), before[name]), name
            continue
        lr, g = {"head": LR_HEAD, "adapter": LR_THETA}[roles[name]], grads[name]
        want = before[name] * (1 - lr * WD) - lr * g / (g.abs() + 1e-8)
        assert torch.allclose(p.detach(), want, rtol=0, atol=1e-7), name
        assert not torch.equal(p.detach(), before[name]), name


def _keyword_rows(n: int, seed: int) -> list[dict]:
    """Sentences of filler words with one keyword that decides the label: "excellent" 1, "terrible" 0."""
    g = torch.Generator().manual_seed(seed)
    filler = "the movie was a film story plot and it actors scenes".split()
    rows = []
    for i in range(n):
        words = [filler[int(k)] for k in torch.randint(0, len(filler), (6,), generator=g)]
        words.insert(int(torch.randint(0, 7, (1,), generator=g)), ("terrible", "excellent")[i % 2])
        rows.append({"sentence": " ".join(words), "label": i % 2})
    return rows


@pytest.mark.slow
def test_theta_alone_learns_a_keyword_task(tiny_bert_dir, tmp_path, monkeypatch):
    """Only θ trains (lr_head 0, no decay: the random head stays as it was), so the task is learned through the
    partition or not at all: d = 1,024 over every linear layer of a 2-layer, 32-wide BERT, 60 steps. The head is
    redrawn at unit scale (a fresh head's 0.02 scale over a LayerNorm-ed 32-wide state caps the logits near ±0.1,
    so no θ could lower the loss much). Balanced classes: the untrained model scores about 0.5; after training
    the mean loss of the last 5 steps is below a third of the first 5's and eval accuracy is at least 0.95 (40
    held-out sentences; measured: loss 7.9 -> 0.23, accuracy 0.5 -> 1.0)."""
    import gpart_cli.train.trainer as trainer_module

    def prepare_with_unit_head(*args):
        prepared = real_prepare(*args)
        with torch.no_grad():
            prepared.model.classifier.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        return prepared

    real_prepare = trainer_module.prepare
    monkeypatch.setattr(trainer_module, "prepare", prepare_with_unit_head)
    files = (write_jsonl(tmp_path / "train.jsonl", _keyword_rows(160, 0)),
             write_jsonl(tmp_path / "eval.jsonl", _keyword_rows(40, 1)))
    recipe = glue_recipe(tiny_bert_dir, files, method__target_modules=["query", "key", "value", "dense"],
                         method__d=1024, train__epochs=6, train__batch_size=16, train__lr_theta=0.2,
                         train__lr_head=0.0, train__weight_decay=0.0, train__log_every=1, data__dev_fraction=0.0)
    results = run(recipe, tmp_path / "run")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < start / 3, (start, end)
    assert results["before"]["accuracy"] <= 0.6 and results["after"]["accuracy"] >= 0.95, results

