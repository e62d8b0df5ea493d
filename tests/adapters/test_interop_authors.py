"""gpart against the authors' own code (SamsungLabs/GPart, a PEFT fork), both directions, on tiny models.

- Their save -> `gpart merge`: the same fp32 weights as their `merge_and_unload` (bit for bit), and `gpart`'s
  logits equal theirs.
- `gpart` export (`gpart convert --to peft-gpart`) -> their `PeftModel.from_pretrained`: the same logits.
- A few AdamW steps from theta = 0 with their partition: the theta trajectories agree to float tolerance.

Their fork replaces the `peft` package, so it is never installed into the project environment: their side runs in
a subprocess (tests/adapters/authors_side.py) with GPART_AUTHORS_PEFT first on PYTHONPATH. Set it up with

    git clone https://github.com/SamsungLabs/GPart /path/to/GPart
    export GPART_AUTHORS_PEFT=/path/to/GPart     # the directory that holds their peft/ package

Without it these tests skip (docs/interop.md).
"""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.adapters.reference import load_adapted
from gpart_cli.commands.app import app
from gpart_cli.core.artifact import save
from gpart_cli.partition import RANDINT, SPLITMIX
from tests.conftest import tiny_gpt2, tiny_llama, tiny_roberta

AUTHORS = os.environ.get("GPART_AUTHORS_PEFT")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not AUTHORS, reason="the authors' GPart fork is not available: git clone https://github.com/SamsungLabs/GPart "
                        "and set GPART_AUTHORS_PEFT to that directory (docs/interop.md)")]
SCRIPT = Path(__file__).with_name("authors_side.py")
AutoModel = {"seq_cls": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM}
TOKENS = [[5, 17, 33, 8, 61, 2, 90, 44, 12], [71, 3, 29, 55, 10, 88, 6, 19, 40]]


# Their last commit before 35b0fa7 (2026-07-22) added assignment_backend: adapters it saved lack the field, and their
# groups came from the per-module torch.randint stream.
BEFORE_BACKENDS = "ffd0442"


@pytest.fixture(scope="module")
def their_code(tmp_path_factory):
    """`at(commit)`: a directory holding their `peft/` package at `commit` (None: the GPART_AUTHORS_PEFT checkout),
    extracted from that clone's history into a temp dir; their code never enters this repository."""
    copies: dict[str, str] = {}

    def at(commit: str | None) -> str:
        if commit is None:
            return AUTHORS
        if commit not in copies:
            res = subprocess.run(["git", "-C", AUTHORS, "archive", "--format=tar", commit, "peft"], capture_output=True)
            if res.returncode != 0:
                pytest.skip(f"{AUTHORS} has no commit {commit} of SamsungLabs/GPart "
                            f"({res.stderr.decode().strip().splitlines()[-1]}); a full git clone has it "
                            f"(git -C {AUTHORS} fetch --unshallow)")
            out = tmp_path_factory.mktemp(f"gpart-{commit}")
            with tarfile.open(fileobj=io.BytesIO(res.stdout)) as tar:
                tar.extractall(out, filter="data")
            copies[commit] = str(out)
        return copies[commit]

    return at


def theirs(*args, code: str | None = None) -> None:
    """Run a command of authors_side.py with their fork (the checkout, or `code`) first on the path."""
    env = {**os.environ, "PYTHONPATH": code or AUTHORS}
    res = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _spec(tmp_path: Path, model, **fields) -> Path:
    base = tmp_path / "base"
    model.save_pretrained(base)
    spec = {"model_dir": str(base), "tokens": TOKENS, "value_seed": 3, **fields}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _our_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS)).logits.float()


CASES = {
    "roberta-stateless-bias-head": (lambda: tiny_roberta(num_labels=3),
                                    {"task": "seq_cls", "d": 37, "seed": 2**63 + 5, "backend": "stateless",
                                     "targets": ["query", "value"], "bias": "gpart_only", "heads": ["classifier"]}),
    # Their merge of a Conv1D layer fails (it adds ΔW transposed to the (in, out) weight), so for GPT-2 the merged
    # model is checked against their unmerged forward, which reads ΔW in the weight's storage order as gpart does.
    "gpt2-conv1d-materialized": (tiny_gpt2, {"task": "causal_lm", "d": 50, "seed": 42, "backend": "materialized",
                                             "targets": ["c_attn"], "bias": "all", "heads": None, "merge": False}),
    # Saved by their code before assignment_backend existed: gpart reads the missing field as torch-randint-v1.
    "llama-saved-before-assignment_backend": (tiny_llama, {"task": "causal_lm", "d": 50, "seed": 7, "backend": None,
                                                           "targets": ["q_proj", "v_proj"], "bias": "none",
                                                           "heads": None, "commit": BEFORE_BACKENDS}),
}


@pytest.mark.parametrize("case", CASES)
def test_their_adapter_merges_to_their_weights(case, tmp_path, their_code):
    make, fields = CASES[case]
    spec = _spec(tmp_path, make(), **fields)
    theirs("save", spec, tmp_path, code=their_code(fields.get("commit")))
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert recorded.get("assignment_backend") == fields["backend"]  # None: their code wrote no such field
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o",
                                   str(tmp_path / "merged"), "--dtype", "float32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    if fields.get("merge", True):
        their_weights = load_file(tmp_path / "merged.safetensors")
        ours = load_file(tmp_path / "merged" / "model.safetensors")
        shared = sorted(set(their_weights) & set(ours))
        assert len(shared) == len(ours)
        worst = max(float((their_weights[k] - ours[k]).abs().max()) for k in shared)
        print(f"{case}: {len(shared)} tensors, max |ours - theirs| = {worst:.3g}")
        assert worst == 0.0  # same fp32 products, same sums: bit for bit
    model, art, _ = load_adapted(str(tmp_path / "base"), tmp_path / "adapter")
    assert art.meta["partition"] == (SPLITMIX if fields["backend"] == "stateless" else RANDINT)
    if fields["backend"] is None:  # inspect says what it read and why
        res = CliRunner().invoke(app, ["inspect", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"),
                                       "--json"])
        assert json.loads(res.output)["imported_from"]["assignment_backend"].startswith(
            "absent: saved by the authors' code before 2026-07-22")
    their_logits = load_file(tmp_path / "logits.safetensors")["logits"]
    merged = AutoModel[fields["task"]].from_pretrained(tmp_path / "merged").eval()
    for ours in (_our_logits(model), _our_logits(merged)):
        print(f"{case}: max |ours - theirs| logits = {float((ours - their_logits).abs().max()):.3g}")
        torch.testing.assert_close(ours, their_logits, rtol=1e-5, atol=1e-6)


def test_gpart_export_loads_in_their_code(tmp_path):
    model = tiny_roberta(num_labels=3)
    spec = _spec(tmp_path, model, task="seq_cls")
    config = gpart.GPartConfig(d=41, seed=2**64 - 9, target_modules=["query", "value"], bias=True,
                               head_modules=["classifier"], partition=SPLITMIX)
    adapted = gpart.apply(model, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        gpart.theta(adapted).copy_(torch.randn(41, generator=g) * 0.5)
        adapted.classifier.out_proj.weight.add_(torch.randn(3, 32, generator=g) * 0.1)
    save(adapted, tmp_path / "a.gpart", task={"type": "sequence_classification", "num_labels": 3})
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "a.gpart"), "--to", "peft-gpart", "-o",
                                   str(tmp_path / "exported")])
    assert res.exit_code == 0, res.output
    theirs("logits", spec, tmp_path / "exported", tmp_path / "their_logits.safetensors")
    their_logits = load_file(tmp_path / "their_logits.safetensors")["logits"]
    ours = _our_logits(adapted.eval())
    print(f"export: max |ours - theirs| logits = {float((ours - their_logits).abs().max()):.3g}")
    torch.testing.assert_close(ours, their_logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,partition", [("stateless", SPLITMIX), ("materialized", RANDINT)])
def test_theta_trajectories_agree(backend, partition, tmp_path):
    steps, lr = 6, 2e-2
    spec = _spec(tmp_path, tiny_llama(), task="causal_lm", d=64, seed=2**63 + 3, backend=backend,
                 targets=["q_proj", "v_proj"], bias="none", steps=steps, lr=lr)
    theirs("train", spec, tmp_path / "trajectory.safetensors")
    their_thetas = load_file(tmp_path / "trajectory.safetensors")
    model = gpart.apply(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
                        gpart.GPartConfig(d=64, seed=2**63 + 3, target_modules=["q_proj", "v_proj"],
                                          partition=partition))
    model.train()
    theta = gpart.theta(model)
    optimizer = torch.optim.AdamW([theta], lr=lr, weight_decay=0.0)
    tokens = torch.tensor(TOKENS)
    worst = 0.0
    for step in range(steps):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        theirs_now = their_thetas[f"theta_{step}"]
        worst = max(worst, float((theta.detach() - theirs_now).abs().max()))
        torch.testing.assert_close(theta.detach(), theirs_now, rtol=1e-4, atol=1e-6)
    print(f"{partition}: {steps} AdamW steps, max |theta_ours - theta_theirs| = {worst:.3g}, "
          f"|theta| = {float(theta.detach().norm()):.3g}")
