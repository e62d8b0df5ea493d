"""`gpart train --dry-run`: the resolved recipe, the data, the trainable parameter count and (SFT) one rendered
training example with its loss mask, from a model's config and tokenizer alone (issue 30, item 7)."""

import shutil

import yaml
from typer.testing import CliRunner

from gpart_cli.commands.app import app
from gpart_cli.recipe.schema import from_dict
from gpart_cli.train.dry_run import LOSS_CLOSE, LOSS_OPEN
from tests.conftest import ASSETS, glue_recipe

runner = CliRunner()


def _without_weights(model_dir, tmp_path):
    """A copy of a model dir with its config and tokenizer only."""
    out = tmp_path / "config-only"
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


def test_a_dry_run_needs_no_weights_and_prints_what_would_train(tiny_bert_dir, sst2_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    raw = glue_recipe(_without_weights(tiny_bert_dir, tmp_path), sst2_files).to_dict()
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / ("a-run-dir-with-a-long-name-" * 3)  # the summary line is wider than 80 columns
    res = runner.invoke(app, ["train", str(recipe), "--output", str(out), "--dry-run", "--set", "method.d=200"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("gpart on"))
    resolved = yaml.safe_load("\n".join(lines[lines.index("resolved recipe:") + 1:summary]))
    assert resolved["method"]["d"] == 200 and resolved["data"]["train_files"] == [str(sst2_files[0])]
    assert (f"gpart on glue/sst2 · 72 train / 24 dev rows · 18 steps · device cpu · output {out}") in lines
    # θ (d 200) + the classifier head of the 32-wide BERT (32 x 2 + 2)
    assert ("trainable parameters: 266 (adapter 200 + head 66), counted on the model's config: no weights were "
            "read") in lines
    assert not out.exists()  # nothing written


def test_an_sft_dry_run_renders_one_training_example_with_its_loss_mask(tiny_llama_dir, tmp_path):
    gsm = ASSETS / "gsm8k"
    raw = {"model": {"name_or_path": str(_without_weights(tiny_llama_dir, tmp_path))},
           "method": {"name": "gpart", "d": 128, "target_modules": ["q_proj", "v_proj"]},
           "data": {"family": "sft", "task": "gsm8k", "train_files": [str(gsm / "train.jsonl")],
                    "max_train_samples": 12, "dev_samples": 4, "max_length": 4096},
           "train": {"max_steps": 3, "batch_size": 4}, "name": "s"}
    recipe = tmp_path / "s.yaml"
    recipe.write_text(yaml.safe_dump(from_dict(raw).to_dict()))
    res = runner.invoke(app, ["train", str(recipe), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "trainable parameters: 128 (adapter 128), counted on the model's config: no weights were read" in res.output
    header = next(line for line in res.output.splitlines() if line.startswith("training example 1 of 8 ("))
    assert header.endswith(f" in the loss, between {LOSS_OPEN} {LOSS_CLOSE}):")
    example = res.output[res.output.index(header) + len(header):]
    prompt, _, rest = example.partition(LOSS_OPEN)
    trained, _, after = rest.partition(LOSS_CLOSE)
    assert "Below is an instruction that describes a task." in prompt and prompt.rstrip().endswith("### Response:")
    assert "\nThe answer is: " in trained and trained.endswith("</s>")  # the response and its eos
    assert LOSS_OPEN not in after  # one loss span: the MetaMath prompt is masked, the response is not
