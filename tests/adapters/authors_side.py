"""The authors' side of the interop tests: runs THEIR code (SamsungLabs/GPart, a PEFT fork), never gpart's.

Run in a subprocess with their fork first on the path (it replaces the `peft` package, so it never enters the
project environment):

    PYTHONPATH=$GPART_AUTHORS_PEFT python tests/adapters/authors_side.py vectors

where GPART_AUTHORS_PEFT is a directory holding their `peft/` package (a clone of SamsungLabs/GPart: its repository
root). Their older code runs the same way from a copy of `peft/` at an older commit (test_interop_authors.py extracts
it from the clone's history into a temp dir). Commands (arguments and results as JSON files):
- `vectors`: print the pinned test vectors of tests/adapters/test_partitions_pinned.py (ids, counts, scales).
- `save SPEC OUT`: apply their GPart to the model dir in SPEC, set theta and the head from SPEC's seed, save the
  adapter to OUT/adapter, their logits to OUT/logits.safetensors and (unless SPEC says merge: false) their merged
  weights to OUT/merged.safetensors.
- `logits SPEC ADAPTER OUT`: load ADAPTER (written by gpart) with their PeftModel.from_pretrained, save logits.
- `train SPEC OUT`: train theta from 0 for SPEC's steps with their layers, save theta after every step.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file


def _assert_theirs() -> None:
    import peft

    if not hasattr(peft, "GPartConfig"):
        raise SystemExit(f"the peft on the path ({peft.__file__}) is not the authors' fork: set PYTHONPATH to it")


def _toy(shapes: list[list[int]], biases: list[bool]) -> torch.nn.Module:
    """A module whose children l0, l1, ... are Linear layers of the given (out, in) shapes (weights all zero)."""
    model = torch.nn.Module()
    for i, ((out, inp), bias) in enumerate(zip(shapes, biases)):
        setattr(model, f"l{i}", torch.nn.Linear(inp, out, bias=bias))
    return model


def _vector(case: dict) -> dict:
    from peft import GPartConfig, get_peft_model

    model = _toy(case["shapes"], case["biases"])
    config = GPartConfig(d=case["d"], proj_seed=case["seed"], target_modules=[f"l{i}" for i in range(len(case["shapes"]))],
                         bias=case["bias"], assignment_backend=case["backend"])
    peft_model = get_peft_model(model, config)
    tuner = peft_model.base_model
    ids = []
    for i in range(len(case["shapes"])):
        layer = getattr(tuner.model, f"l{i}")
        ids.append(layer._get_group_ids("default", torch.device("cpu")).tolist())
    scales = tuner.gpart_global_scales["default"]
    return {**case, "ids": ids, "scales_hex": [float(s).hex() for s in scales.tolist()]}


CASES = [
    {"backend": "stateless", "seed": 0, "d": 7, "shapes": [[3, 5], [2, 4]], "biases": [True, False],
     "bias": "gpart_only"},
    {"backend": "stateless", "seed": 2**63 + 12345, "d": 10, "shapes": [[4, 6], [5, 3]], "biases": [True, True],
     "bias": "none"},
    {"backend": "stateless", "seed": 2**64 - 3, "d": 24, "shapes": [[3, 4], [2, 3]], "biases": [True, True],
     "bias": "all"},
    {"backend": "materialized", "seed": 42, "d": 13, "shapes": [[4, 8], [5, 3]], "biases": [True, False],
     "bias": "all"},
    {"backend": "materialized", "seed": 2**63 + 7, "d": 6, "shapes": [[2, 5], [3, 3]], "biases": [False, True],
     "bias": "gpart_only"},
]
# Random access far from 0: their generate_implicit_group_ids on (start, numel, d, seed).
FAR = [(10**12, 6, 1_000_003, 2**63 + 5), (2**40 + 17, 5, 23_040, 7), (123_456_789, 4, 3, 2**64 - 1)]


def vectors() -> None:
    from peft.tuners.gpart import generate_implicit_group_ids

    far = [{"start": s, "numel": n, "d": d, "seed": seed,
            "ids": generate_implicit_group_ids(s, n, d, seed, "cpu").tolist()} for s, n, d, seed in FAR]
    print(json.dumps({"cases": [_vector(c) for c in CASES], "far": far}, indent=1))


# ---------------------------------------------------------------------------------------------------
# Models from a spec: {"model_dir", "task", "d", "seed", "backend", "targets", "bias", "heads", "tokens"}
# ---------------------------------------------------------------------------------------------------

def _base(spec: dict):
    import transformers

    cls = {"seq_cls": transformers.AutoModelForSequenceClassification,
           "causal_lm": transformers.AutoModelForCausalLM}[spec["task"]]
    return cls.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()


def _peft_model(spec: dict):
    from peft import GPartConfig, get_peft_model

    # backend None: their code from before assignment_backend existed (it has no such argument)
    backend = {} if spec["backend"] is None else {"assignment_backend": spec["backend"]}
    config = GPartConfig(d=spec["d"], proj_seed=spec["seed"], target_modules=spec["targets"], bias=spec["bias"],
                         modules_to_save=spec.get("heads"),
                         task_type={"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}[spec["task"]], **backend)
    return get_peft_model(_base(spec), config)


def _logits(model, spec: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(spec["tokens"])).logits.float().contiguous()


def save(spec_path: str, out: str) -> None:
    spec = json.loads(open(spec_path).read())
    model = _peft_model(spec)
    gen = torch.Generator().manual_seed(spec["value_seed"])
    with torch.no_grad():
        theta = model.base_model.gpart_theta_d["default"]
        theta.copy_(torch.randn(theta.shape, generator=gen) * 0.5)
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(f"{out}/adapter")
    save_file({"logits": _logits(model.eval(), spec)}, f"{out}/logits.safetensors")
    if not spec.get("merge", True):
        return  # their merge of a Conv1D (GPT-2) layer fails: it adds the transposed ΔW to the (in, out) weight
    # Their per-layer merge (GPart Linear.merge). merge_and_unload itself trips over a modules_to_save head that is
    # not a Linear (a RoBERTa classification head), so the merged weights are read back from the layers.
    model.base_model.merge_adapter()
    merged = {}
    for name, p in model.base_model.model.state_dict().items():
        if ".original_module." in name:
            continue
        merged[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = p.contiguous()
    save_file(merged, f"{out}/merged.safetensors")


def logits(spec_path: str, adapter: str, out: str) -> None:
    from peft import PeftModel

    spec = json.loads(open(spec_path).read())
    model = PeftModel.from_pretrained(_base(spec), adapter).eval()
    save_file({"logits": _logits(model, spec)}, out)


def train(spec_path: str, out: str) -> None:
    spec = json.loads(open(spec_path).read())
    model = _peft_model(spec)
    model.train()
    theta = model.base_model.gpart_theta_d["default"]
    optimizer = torch.optim.AdamW([theta], lr=spec["lr"], weight_decay=0.0)
    tokens = torch.tensor(spec["tokens"])
    trajectory = {}
    for step in range(spec["steps"]):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trajectory[f"theta_{step}"] = theta.detach().clone()
    save_file(trajectory, out)


if __name__ == "__main__":
    _assert_theirs()
    command, *args = sys.argv[1:]
    {"vectors": vectors, "save": save, "logits": logits, "train": train}[command](*args)
