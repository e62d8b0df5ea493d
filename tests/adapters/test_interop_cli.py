"""gpart on the authors' adapter files without their code: read, refuse, convert, merge, eval, inspect, init_from.

The adapter dirs here are written the way their fork writes them (the adapter_config.json below is what their
`save_pretrained` wrote for a SEQ_CLS model, PEFT's duplicated modules_to_save included; tensor keys
`base_model.gpart_theta_d` and `base_model.model.<head>.<param>`). test_interop_authors.py checks the same paths
against their code itself when it is installed.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.adapters import authors_format as peft_gpart
from gpart_cli.commands.app import app
from gpart_cli.core.artifact import read_artifact, save
from gpart_cli.partition import RANDINT, SPLITMIX, Partition
from tests.conftest import tiny_roberta

runner = CliRunner()
THEIR_CONFIG = {
    "assignment_backend": "stateless", "auto_mapping": None, "base_model_name_or_path": "/somewhere/base",
    "bias": "gpart_only", "d": 37, "fan_in_fan_out": False, "gpart_dropout": 0.1, "grouping_strategy": "random",
    "inference_mode": True, "init_bound": 0.0, "isometric": True, "layers_pattern": None, "layers_to_transform": None,
    "modules_to_save": ["classifier", "classifier", "score"], "partition_scope": "global", "peft_type": "GPART",
    "peft_version": "0.18.2.dev0@UNKNOWN", "proj_seed": 9223372036854775813, "projection_type": "partition",
    "revision": None, "target_modules": ["query", "value"], "task_type": "SEQ_CLS",
}


# Their code before 2026-07-22 (SamsungLabs/GPart ffd0442) wrote no assignment_backend (nor the two fields below).
ABSENT = object()
BEFORE_BACKENDS = {"assignment_backend": ABSENT, "partition_scope": ABSENT, "projection_type": ABSENT}


def write_theirs(directory, model, config=None, seed=3):
    """An authors' adapter dir for `model` (a classifier with `classifier` head): random theta and head. A field
    set to ABSENT is left out."""
    config = {k: v for k, v in {**THEIR_CONFIG, **(config or {})}.items() if v is not ABSENT}
    g = torch.Generator().manual_seed(seed)
    tensors = {"base_model.gpart_theta_d": torch.randn(config["d"], generator=g) * 0.5}
    for name, p in model.named_parameters():
        if name.startswith("classifier."):
            tensors["base_model.model." + name] = p.detach() + 0.1 * torch.randn(p.shape, generator=g)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture
def roberta_dir(tmp_path):
    model = tiny_roberta(num_labels=3)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base", model


def test_read_maps_every_field(tmp_path, roberta_dir):
    _, model = roberta_dir
    adapter = peft_gpart.read(write_theirs(tmp_path / "a", model) / "adapter_model.safetensors")  # either file works
    assert (adapter.d, adapter.seed, adapter.partition, adapter.bias, adapter.isometric) == (37, 2**63 + 5, SPLITMIX,
                                                                                             True, True)
    assert adapter.target_modules == ("query", "value") and adapter.head_modules == ("classifier", "score")
    assert adapter.dropout == 0.1 and adapter.task_type == "sequence_classification" and adapter.num_labels == 3
    assert sorted(adapter.head) == ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                                    "classifier.out_proj.weight"]
    materialized = peft_gpart.read(write_theirs(tmp_path / "b", model, {"assignment_backend": "legacy_streaming",
                                                                        "proj_seed": -1, "bias": "none"}))
    assert (materialized.partition, materialized.seed, materialized.bias) == (RANDINT, 2**64 - 1, False)


WHOLE_MODULES = "gpart adapts whole target modules only; re-save the adapter without it"
UNKNOWN = "this gpart does not know the field"


@pytest.mark.parametrize("field,value,why", [
    ("projection_type", "fastfood", "the Fastfood projection is dense"),
    ("grouping_strategy", "signed_magnitude", "signed-magnitude grouping depends on the pretrained weights"),
    ("partition_scope", "transformer_block", "per-transformer-block partitions are not implemented"),
    # the fields that must be empty: each would make their code adapt other weights than gpart does
    ("layers_to_transform", [0], WHOLE_MODULES),
    ("exclude_modules", ["roberta.encoder.layer.0.attention.self.query"], WHOLE_MODULES),
    ("target_parameters", ["attention.self.query.weight"], WHOLE_MODULES),
    ("trainable_token_indices", [1, 2], WHOLE_MODULES),
    ("layer_replication", [[0, 1]], WHOLE_MODULES),
    ("use_dora", True, WHOLE_MODULES),
    ("target_modules", "all-linear", "'all-linear' depends on PEFT's output-layer rules"),
    ("assignment_backend", "cuda_magic", "use stateless (splitmix64-mod-v1) or materialized"),
    ("bias", "lora_only", "use none, all or gpart_only"),
    ("use_rslora", True, UNKNOWN)])
def test_unsupported_fields_are_refused_with_their_name(tmp_path, roberta_dir, field, value, why):
    base, model = roberta_dir
    adapter = write_theirs(tmp_path / "a", model, {field: value})
    for args in (["merge", str(base), str(adapter), "-o", str(tmp_path / "m")],
                 ["convert", str(adapter), "-o", str(tmp_path / "x.gpart"), "--model", str(base)]):
        res = runner.invoke(app, args)
        message = " ".join(res.output.split())
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert f"{field} = {value!r} is not supported: {why}" in message, message
    assert not (tmp_path / "m").exists() and not (tmp_path / "x.gpart").exists()


@pytest.mark.parametrize("config,partition", [({}, SPLITMIX), (BEFORE_BACKENDS, RANDINT)],
                         ids=["stateless", "saved-before-assignment_backend"])
def test_merge_equals_w0_plus_their_partition(tmp_path, roberta_dir, config, partition):
    # An adapter without assignment_backend comes from their code before the field existed: torch.randint groups
    # (read as their later default, stateless, the merged weights were off by up to 0.04 on a tiny Llama).
    base, model = roberta_dir
    adapter = write_theirs(tmp_path / "a", model, config)
    res = runner.invoke(app, ["merge", str(base), str(adapter), "-o", str(tmp_path / "m"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    merged = load_file(tmp_path / "m" / "model.safetensors")
    theta = load_file(adapter / "adapter_model.safetensors")["base_model.gpart_theta_d"]
    targets = [(n, m) for n, m in model.named_modules() if n.endswith((".query", ".value"))]
    sizes = [m.weight.numel() + m.bias.numel() for _, m in targets]
    part = Partition(partition, sum(sizes), 37, 2**63 + 5, sizes)  # the ids the pinned vectors check
    table, offset = theta * part.scales(True), 0
    for (name, m), size in zip(targets, sizes):
        delta = table[part.ids(offset, size).long()]
        assert torch.equal(merged[name + ".weight"], m.weight.detach() + delta[:m.weight.numel()].view_as(m.weight))
        assert torch.equal(merged[name + ".bias"], m.bias.detach() + delta[m.weight.numel():])
        offset += size
    head = load_file(adapter / "adapter_model.safetensors")["base_model.model.classifier.out_proj.weight"]
    assert torch.equal(merged["classifier.out_proj.weight"], head)
    untouched = "roberta.encoder.layer.0.attention.self.key.weight"
    assert torch.equal(merged[untouched], dict(model.named_parameters())[untouched].detach())


def test_convert_both_ways_and_inspect(tmp_path, roberta_dir):
    base, model = roberta_dir
    adapter = write_theirs(tmp_path / "a", model)
    res = runner.invoke(app, ["convert", str(adapter), "-o", str(tmp_path / "x.gpart"), "--model", str(base)])
    assert res.exit_code == 0, res.output
    art = read_artifact(tmp_path / "x.gpart")
    assert (art.meta["partition"], art.meta["d"], art.meta["seed"], art.meta["n_params"]) == (SPLITMIX, 37,
                                                                                              2**63 + 5, 4 * 32 * 33)
    assert [t["name"] for t in art.meta["targets"]] == [f"roberta.encoder.layer.{i}.attention.self.{k}"
                                                        for i in (0, 1) for k in ("query", "value")]
    assert art.meta["imported_from"]["adapter_config"]["proj_seed"] == 2**63 + 5
    res = runner.invoke(app, ["inspect", str(tmp_path / "x.gpart"), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["partition"] == SPLITMIX
    res = runner.invoke(app, ["inspect", str(adapter), "--model", str(base), "--json"])
    summary = json.loads(res.output)
    assert summary["partition"] == SPLITMIX and summary["n_params"] == 4 * 32 * 33
    assert summary["imported_from"]["format"] == "peft-gpart"
    res = runner.invoke(app, ["inspect", str(adapter), "--model", str(base)])
    assert res.exit_code == 0 and "splitmix64-mod-v1" in res.output and "imported from" in res.output
    # and back: the same theta and head under their key names, a config their code reads
    res = runner.invoke(app, ["convert", str(tmp_path / "x.gpart"), "--to", "peft-gpart", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    again = peft_gpart.read(tmp_path / "b")
    assert (again.partition, again.seed, again.d, again.bias) == (SPLITMIX, 2**63 + 5, 37, True)
    assert torch.equal(again.theta, art.theta) and sorted(again.head) == sorted(art.head)
    theirs = load_file(adapter / "adapter_model.safetensors")  # the head's values went through both conversions
    assert all(torch.equal(again.head[k], theirs["base_model.model." + k]) for k in art.head)
    assert len(art.head) == 4 and all(torch.equal(art.head[k], again.head[k]) for k in art.head)
    written = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert written["assignment_backend"] == "stateless" and written["bias"] == "gpart_only"
    assert written["task_type"] == "SEQ_CLS" and written["modules_to_save"] == ["classifier", "score"]


@pytest.fixture
def wide(monkeypatch):
    """The CLI's console 250 columns wide: table cells on one line each."""
    from gpart_cli.commands.common import console

    monkeypatch.setattr(console, "width", 250)


def test_inspect_without_a_resolvable_base_shows_what_the_adapter_says(tmp_path, roberta_dir, wide):
    # Their file records module-name patterns, not the module spec: without a base it still says d, seed, partition,
    # targets, head and θ, and what --model adds. (THEIR_CONFIG records a local base, which gpart does not open.)
    _, model = roberta_dir
    adapter = write_theirs(tmp_path / "a", model)
    theta = load_file(adapter / "adapter_model.safetensors")["base_model.gpart_theta_d"].double()
    res = runner.invoke(app, ["inspect", str(adapter), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert (summary["d"], summary["seed"], summary["partition"], summary["target_modules"], summary["bias"]) == \
        (37, 2**63 + 5, SPLITMIX, ["query", "value"], True)
    assert summary["theta"]["norm"] == pytest.approx(float(theta.norm()))
    assert summary["head"]["classifier.out_proj.weight"] == [3, 32] and summary["head_params"] == 32 * 32 + 32 + 3 * 33
    assert summary["unresolved"]["why"] == (f"{adapter} was trained on the local model /somewhere/base; pass --model "
                                            "/somewhere/base to confirm (gpart does not open local paths named only "
                                            "inside an adapter)")
    assert "n_params" not in summary and "targets" not in summary
    res = runner.invoke(app, ["inspect", str(adapter)])
    text = " ".join(res.output.split())
    assert res.exit_code == 0, res.output
    for shown in ("partition splitmix64-mod-v1", "37 · 9223372036854775813", "query, value (biases adapted)",
                  f"‖θ‖={float(theta.norm()):.4g}", "assignment_backend stateless (splitmix64-mod-v1)",
                  "--model BASE adds │ the module spec (target names and shapes), N and weights per θ entry, the "
                  "base fingerprint and the size vs LoRA r=8"):
        assert shown in text, shown
    # Not recorded at all: the same summary, and the reason.
    (adapter / "adapter_config.json").write_text(json.dumps({**THEIR_CONFIG, "base_model_name_or_path": None}))
    summary = json.loads(runner.invoke(app, ["inspect", str(adapter), "--json"]).output)
    assert summary["unresolved"]["why"] == f"{adapter} does not record its base model; pass --model"


def test_inspect_says_why_an_adapter_without_assignment_backend_is_torch_randint(tmp_path, roberta_dir, wide):
    base, model = roberta_dir
    adapter = write_theirs(tmp_path / "a", model, BEFORE_BACKENDS)
    why = ("absent: saved by the authors' code before 2026-07-22 (SamsungLabs/GPart 35b0fa7 added the field, and "
           "PEFT writes every field), whose groups came from torch.randint; read as torch-randint-v1")
    for args in ([], ["--model", str(base)]):
        res = runner.invoke(app, ["inspect", str(adapter), "--json", *args])
        summary = json.loads(res.output)
        assert summary["partition"] == RANDINT and summary["imported_from"]["assignment_backend"] == why
        res = runner.invoke(app, ["inspect", str(adapter), *args])
        assert f"assignment_backend {why}" in " ".join(res.output.split())

def test_feistel_adapters_are_not_exported(tmp_path):
    model = gpart.apply(tiny_roberta(), gpart.GPartConfig(d=16, target_modules=["query"]))
    save(model, tmp_path / "f.gpart", task={"type": "sequence_classification"})
    res = runner.invoke(app, ["convert", str(tmp_path / "f.gpart"), "--to", "peft-gpart", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "feistel-v1" in res.output and "method.partition" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("partition", [SPLITMIX, RANDINT])
def test_gpart_trains_with_their_partitions_and_exports(tmp_path, partition):
    model = gpart.apply(tiny_roberta(), gpart.GPartConfig(d=16, seed=7, target_modules=["query"], partition=partition))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.arange(16.0))
    save(model, tmp_path / "p.gpart", task={"type": "sequence_classification"})
    art = read_artifact(tmp_path / "p.gpart")
    assert art.meta["partition"] == partition and art.config.partition == partition
    reloaded = gpart.load(tiny_roberta(), tmp_path / "p.gpart")
    assert torch.equal(gpart.theta(reloaded), torch.arange(16.0))
    peft_gpart.write(tmp_path / "o", art.meta, art.theta, art.head)
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["assignment_backend"] == \
        {SPLITMIX: "stateless", RANDINT: "materialized"}[partition]


@pytest.mark.slow
def test_eval_merge_and_init_from_accept_their_adapter(tmp_path, tiny_bert_dir, sst2_files):
    import yaml
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    adapter = write_theirs(tmp_path / "theirs", base, {"assignment_backend": "materialized", "bias": "none",
                                                       "proj_seed": 11, "modules_to_save": ["classifier"]})
    scores = {}
    res = runner.invoke(app, ["merge", str(tiny_bert_dir), str(adapter), "-o", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    for name, args in {"adapter": ["--adapter", str(adapter), "--model", str(tiny_bert_dir)],
                       "merged": ["--model", str(tmp_path / "merged")]}.items():
        res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--data", str(sst2_files[1]), *args, "--output",
                                  str(tmp_path / f"{name}.json")])
        assert res.exit_code == 0, res.output
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["scores"]
    assert scores["adapter"] == scores["merged"]
    recipe = {"model": {"name_or_path": str(tiny_bert_dir)},
              "method": {"name": "gpart", "d": 37, "seed": 11, "partition": RANDINT, "target_modules": ["query", "value"],
                         "init_from": str(adapter)},
              "data": {"family": "glue", "task": "sst2", "train_files": [str(sst2_files[0])],
                       "eval_files": [str(sst2_files[1])], "max_length": 128},
              "train": {"max_steps": 1, "batch_size": 8}, "eval": {"batch_size": 16}, "name": "t"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "results.json").read_text())["before"] == scores["adapter"]
    res = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "run2"), "--set",
                              "method.seed=12"])
    assert res.exit_code == 2 and "method.seed" in res.output and "11" in res.output, res.output


def test_recipe_partition_field():
    from gpart_cli.errors import GpartError
    from gpart_cli.recipe.schema import from_dict

    raw = {"model": {"name_or_path": "x"}, "method": {"partition": SPLITMIX}}
    assert from_dict(raw).method.partition == SPLITMIX
    assert from_dict({"model": {"name_or_path": "x"}}).method.partition == "feistel-v1"
    with pytest.raises(GpartError, match="method.partition = 'splitmix64' is not one of .*did you mean "
                                         "'splitmix64-mod-v1'"):
        from_dict({"model": {"name_or_path": "x"}, "method": {"partition": "splitmix64"}})
    with pytest.raises(GpartError, match="partition = 'xorshift' is not a known partition algorithm"):
        gpart.GPartConfig(d=4, partition="xorshift")


def test_init_from_is_gpart_only(tmp_path):
    from gpart_cli.errors import GpartError
    from gpart_cli.recipe.methods import prepare
    from gpart_cli.recipe.schema import MethodSection, TrainSection

    method = MethodSection(name="lora", target_modules=["query"], init_from=str(tmp_path))
    with pytest.raises(GpartError, match="method.init_from applies to method gpart, not lora"):
        prepare(tiny_roberta(), method, TrainSection(), "sequence_classification")


def test_headed_adapter_without_task_type_on_a_headless_base(tmp_path, roberta_dir):
    """Their GLUE and ViT scripts set no task_type and start from a backbone checkpoint (roberta-base)."""
    base, model = roberta_dir
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["RobertaForMaskedLM"]}))
    adapter = write_theirs(tmp_path / "a", model, {"task_type": None})
    res = runner.invoke(app, ["merge", str(base), str(adapter), "-o", str(tmp_path / "m"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    merged = json.loads((tmp_path / "m" / "config.json").read_text())
    assert merged["architectures"] == ["RobertaForSequenceClassification"] and len(merged["id2label"]) == 3
    head = load_file(adapter / "adapter_model.safetensors")["base_model.model.classifier.out_proj.weight"]
    assert torch.equal(load_file(tmp_path / "m" / "model.safetensors")["classifier.out_proj.weight"], head)
