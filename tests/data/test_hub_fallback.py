"""A fresh machine without ../shared: recipes that name local files fall back to the hub dataset with the
same rows, say so, and name both sources when neither is reachable. The hub is mocked at `datasets.load_dataset`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from gpart_cli.commands.app import app
from gpart_cli.data.glue import load_glue_rows
from gpart_cli.data.sources import load_rows_with_source
from gpart_cli.data.vision import FASHION_MNIST, load_image_rows
from gpart_cli.errors import GpartError
from gpart_cli.evaluation.tasks import load_task_rows
from gpart_cli.recipe.schema import load_recipe
from tests.conftest import ASSETS, head_rows, write_jsonl

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
LOCAL_BUILDERS = ("json", "csv", "parquet", "imagefolder")


@pytest.fixture
def hub(monkeypatch):
    """`datasets.load_dataset` for hub ids answers from `served` (else raises as offline); local builders are real."""
    import datasets

    real = datasets.load_dataset
    state = SimpleNamespace(served={}, calls=[])

    def load_dataset(path, name=None, *args, split=None, revision=None, **kwargs):
        if path in LOCAL_BUILDERS:
            return real(path, name, *args, split=split, **kwargs)
        state.calls.append((path, name, split, revision))
        if (path, name, split) not in state.served:
            raise ConnectionError("Couldn't reach the Hugging Face Hub (mocked offline)")
        return state.served[(path, name, split)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return state


def _glue_split(path: Path, n: int):
    import datasets

    return datasets.Dataset.from_list(head_rows(path, n))


def test_glue_quickstart_falls_back_to_the_same_hub_rows(hub, tmp_path, capsys):
    data = load_recipe(RECIPES / "quickstart-sst2-minilm.yaml").data
    assert (data.path, data.config) == ("nyu-mll/glue", "sst2")
    rows_500 = head_rows(ASSETS / "glue" / "sst2" / "train.jsonl", 500)
    local = write_jsonl(tmp_path / "train.jsonl", rows_500)
    hub.served[("nyu-mll/glue", "sst2", "train")] = _glue_split(local, 500)
    from_files, _ = load_glue_rows(data, [str(local)], "train", 100, 0, "training data")
    assert hub.calls == []  # the files are there: no hub call
    absent = str(tmp_path / "no-shared" / "train.jsonl")
    from_hub, _ = load_glue_rows(data, [absent], "train", 100, 0, "training data")
    assert hub.calls == [("nyu-mll/glue", "sst2", "train", None)]
    assert from_hub["sentence"] == from_files["sentence"] and from_hub["label"] == from_files["label"]
    err = " ".join(capsys.readouterr().err.split())
    assert f"training data: {absent} is not here; using the hub dataset nyu-mll/glue (config sst2, split train)" in err


def test_offline_with_neither_names_both_sources(hub, tmp_path):
    data = load_recipe(RECIPES / "quickstart-sst2-minilm.yaml").data
    absent = str(tmp_path / "train.jsonl")
    with pytest.raises(GpartError) as e:
        load_glue_rows(data, [absent], "train", None, 0, "training data")
    message = " ".join(str(e.value).split())
    assert f"training data: local file {absent} does not exist, and the hub dataset nyu-mll/glue (config sst2, " \
           f"split train) could not be loaded (Couldn't reach the Hugging Face Hub (mocked offline))" in message


def test_absent_files_without_a_hub_dataset_are_an_error_naming_the_file(hub, tmp_path):
    absent = str(tmp_path / "trainset.json")
    with pytest.raises(GpartError, match=f"training data file {absent} does not exist; .* set data.path/data.config"):
        load_rows_with_source([absent], None, None, "train", what="training data")
    assert hub.calls == []


def test_quickstart_dry_run_on_a_machine_without_shared(hub, tmp_path):
    """README's first command in a clone that does not sit beside shared/: it trains from the hub rows."""
    hub.served[("nyu-mll/glue", "sst2", "train")] = _glue_split(ASSETS / "glue" / "sst2" / "train.jsonl", 4000)
    hub.served[("nyu-mll/glue", "sst2", "validation")] = _glue_split(ASSETS / "glue" / "sst2" / "validation.jsonl",
                                                                     872)
    gone = tmp_path / "shared-is-not-here"
    res = CliRunner().invoke(app, ["train", str(RECIPES / "quickstart-sst2-minilm.yaml"), "--dry-run", "--output",
                                   str(tmp_path / "run"), "--set", f"data.train_files=[{gone}/train.jsonl]",
                                   "--set", f"data.eval_files=[{gone}/validation.jsonl]"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "using the hub dataset nyu-mll/glue (config sst2, split train)" in out
    assert "using the hub dataset nyu-mll/glue (config sst2, split validation)" in out
    assert "2,700 train / 300 dev rows" in out  # max_train_samples 3,000 minus a 10% dev split, as from the files


def test_fashion_idx_files_fall_back_to_the_hub_copy(hub, tmp_path, capsys):
    """The hub's fashion_mnist holds the IDX files' images in the same order: the same seeded subset comes back,
    with the task's class names."""
    import datasets

    recipe = load_recipe(RECIPES / "heldout-fashion4-vit.yaml")
    data = recipe.data
    assert (data.path, data.eval_split) == ("zalando-datasets/fashion_mnist", "test")
    fm = ASSETS / "fashion_mnist"
    idx = [str(fm / "t10k-images-idx3-ubyte.gz"), str(fm / "t10k-labels-idx1-ubyte.gz")]
    local_all, _ = load_image_rows(idx, None, None, "test", data)
    hub_names = ["T - shirt / top", *FASHION_MNIST[1:]]  # how the hub spells class 0
    hub.served[("zalando-datasets/fashion_mnist", None, "test")] = local_all.cast_column(
        "label", datasets.ClassLabel(names=hub_names))
    local, names = load_image_rows(idx, data.path, None, "test", data, 20, 5)
    absent = [str(tmp_path / Path(f).name) for f in idx]
    fallback, fallback_names = load_image_rows(absent, data.path, None, "test", data, 20, 5, "eval data")
    assert fallback_names == names == FASHION_MNIST
    assert fallback["label"] == local["label"]
    assert [im.tobytes() for im in fallback["image"]] == [im.tobytes() for im in local["image"]]
    err = " ".join(capsys.readouterr().err.split())
    assert "using the hub dataset zalando-datasets/fashion_mnist (split test)" in err


def test_sft_and_generation_eval_files_fall_back(hub, tmp_path):
    recipe = load_recipe(RECIPES / "quickstart-gsm8k-smollm2.yaml")
    train = _glue_split(ASSETS / "gsm8k" / "train.jsonl", 50)
    test = _glue_split(ASSETS / "gsm8k" / "test.jsonl", 10)
    hub.served[("openai/gsm8k", "main", "train")] = train
    hub.served[("openai/gsm8k", "main", "test")] = test
    rows, source = load_rows_with_source([str(tmp_path / "train.jsonl")], recipe.data.path, recipe.data.config,
                                         recipe.data.train_split, what="training data")
    assert rows["question"] == train["question"] and source == "openai/gsm8k (config main, split train)"
    assert recipe.eval.files and recipe.eval.task == "gsm8k"
    evaluated = load_task_rows("gsm8k", [str(tmp_path / "test.jsonl")], None, 3)
    assert [r["question"] for r in evaluated] == test["question"][:3]


def test_math_runs_offline_from_shared_and_names_its_hub_copy(hub):
    full = load_task_rows("math", [str(ASSETS / "math" / "test.jsonl")], None, None)
    subset = load_task_rows("math500", [str(ASSETS / "math" / "test_math500.jsonl")], None, None)
    assert (len(full), len(subset)) == (5000, 500) and hub.calls == []
    with pytest.raises(GpartError, match="DigitalLearningGmbH/MATH-lighteval \\(config default, split test\\)"):
        load_task_rows("math", None, None, 2)
    with pytest.raises(GpartError, match="HuggingFaceH4/MATH-500 \\(split test\\)"):
        load_task_rows("math500", None, None, 2)


def test_the_hub_revision_reaches_datasets(hub):
    data = load_recipe(RECIPES / "vit-base-fgvc-aircraft.yaml").data
    with pytest.raises(GpartError):
        load_image_rows(None, data.path, data.config, data.train_split, data, what="train data")
    assert hub.calls == [("HuggingFaceM4/FGVC-Aircraft", None, "train", "refs/pr/1")]


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_with_local_files_names_a_hub_fallback(path):
    """Local files are a convenience of this machine: each recipe says where the same rows live on the hub (MAWPS,
    which has no hub copy of this split, says so in its header instead). Example data shipped in the project
    (recipes/data/) is in every clone and needs none."""
    from gpart_cli.evaluation.tasks import GENERATION_TASKS

    recipe = load_recipe(path)
    text = path.read_text()
    files = [*(recipe.data.train_files or []), *(recipe.data.eval_files or [])]
    shipped = all(str(f).startswith("recipes/data/") and (RECIPES.parent / f).is_file() for f in files)
    if files and not shipped:
        assert recipe.data.path or recipe.data.family == "glue" or "has no copy on the hub" in text, path.name
    if recipe.eval.files:
        assert GENERATION_TASKS[recipe.eval.task].hub[0] or "has no copy on the hub" in text, path.name
