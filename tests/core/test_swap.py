"""Many adapters on one base: `gpart.swap`, `gpart eval --adapter a,b`, `gpart merge --check`."""

import copy
import json
import re

import pytest
import torch
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.commands.app import app
from gpart_cli.errors import GpartError
from tests.conftest import tiny_roberta

runner = CliRunner()
CONFIG = gpart.GPartConfig(d=40, seed=1, target_modules=["query", "value"], bias=True, head_modules=["classifier"])
TASK = {"type": "sequence_classification", "num_labels": 3, "labels": ["a", "b", "c"]}


def _adapter(base, path, seed: int, config=CONFIG):
    """Save an adapter of `base` with a seeded random θ and a shifted head; returns the path."""
    model = gpart.apply(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(config.d, generator=g) * 0.5)
        model.classifier.out_proj.bias.add_(torch.randn(3, generator=g))
    return gpart.save(model, path, task=TASK)


@pytest.fixture
def base_and_adapters(tmp_path):
    base = tiny_roberta(num_labels=3)
    return base, _adapter(base, tmp_path / "a.gpart", 1), _adapter(base, tmp_path / "b.gpart", 2)


def _logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens).logits


def test_swap_on_an_adapted_model_equals_a_fresh_load(base_and_adapters, tokens):
    base, a, b = base_and_adapters
    model = gpart.load(copy.deepcopy(base), a)
    assert gpart.swap(model, b) is model
    assert torch.equal(_logits(model, tokens), _logits(gpart.load(copy.deepcopy(base), b), tokens))


def test_swap_on_a_merged_model_equals_merging_the_new_adapter(base_and_adapters, tokens):
    base, a, b = base_and_adapters
    merged_b = gpart.merge(gpart.load(copy.deepcopy(base), b))
    model = gpart.merge(gpart.load(copy.deepcopy(base), a))
    gpart.swap(model, b)  # W += P(θ_b - θ_a): one fp32 pass
    for (name, w), w_b in zip(model.state_dict().items(), merged_b.state_dict().values()):
        torch.testing.assert_close(w, w_b, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(_logits(model, tokens), _logits(merged_b, tokens), rtol=0, atol=1e-5)
    gpart.swap(model, a)  # and back
    merged_a = gpart.merge(gpart.load(copy.deepcopy(base), a))
    for w, w_a in zip(model.state_dict().values(), merged_a.state_dict().values()):
        torch.testing.assert_close(w, w_a, rtol=0, atol=1e-6)


def test_swap_into_a_plain_base_merges(base_and_adapters, tokens):
    base, a, _ = base_and_adapters
    model = gpart.swap(copy.deepcopy(base), a)
    expected = gpart.merge(gpart.load(copy.deepcopy(base), a))
    assert all(torch.equal(w, w0) for w, w0 in zip(model.state_dict().values(), expected.state_dict().values()))


def test_swap_refuses_another_partition_or_head(base_and_adapters, tmp_path):
    base, a, _ = base_and_adapters
    other_seed = _adapter(base, tmp_path / "s.gpart", 3, CONFIG.__class__(**{**CONFIG.__dict__, "seed": 2}))
    for model in (gpart.load(copy.deepcopy(base), a), gpart.merge(gpart.load(copy.deepcopy(base), a))):
        with pytest.raises(GpartError, match=r"s\.gpart into this .*partition differs \(seed 1 vs 2\)"):
            gpart.swap(model, other_seed)
    two_labels = tiny_roberta(num_labels=2)
    narrow = gpart.apply(copy.deepcopy(two_labels), CONFIG)
    gpart.save(narrow, tmp_path / "n.gpart")
    with pytest.raises(GpartError, match=r"head tensor 'classifier.out_proj.bias' \(2,\) does not fit"):
        gpart.swap(gpart.load(copy.deepcopy(base), a), tmp_path / "n.gpart")


def test_stacked_merges_of_different_partitions_cannot_be_swapped(base_and_adapters, tmp_path):
    base, a, b = base_and_adapters
    other = _adapter(base, tmp_path / "o.gpart", 4, CONFIG.__class__(**{**CONFIG.__dict__, "d": 30}))
    model = gpart.merge(gpart.load(gpart.merge(gpart.load(copy.deepcopy(base), a)), other))
    with pytest.raises(GpartError, match="different partitions merged into it"):
        gpart.swap(model, b)


# ---------------------------------------------------------------- CLI


@pytest.fixture
def bert_adapters(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    config = gpart.GPartConfig(d=64, seed=0, target_modules=["query", "value"], head_modules=["classifier"])
    paths = []
    for seed, name in ((1, "a"), (2, "b"), (3, "c")):
        model = gpart.apply(copy.deepcopy(base), config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            gpart.theta(model).copy_(torch.randn(64, generator=g) * 2)
            model.classifier.weight.copy_(torch.randn(2, 32, generator=g))
        paths.append(gpart.save(model, tmp_path / f"{name}.gpart",
                                task={"type": "sequence_classification", "num_labels": 2, "labels": ["n", "p"]}))
    return paths


@pytest.mark.slow
def test_eval_several_adapters_loads_the_base_once_and_scores_as_separate_runs(
        bert_adapters, tiny_bert_dir, sst2_files, tmp_path, monkeypatch):
    import gpart_cli.adapters.loading as loading

    loads, auto_class = [], loading.auto_class

    class Counted:  # every base load goes through auto_class(task_type).from_pretrained
        def __init__(self, task_type):
            self.cls = auto_class(task_type)

        def from_pretrained(self, *args, **kwargs):
            loads.append(args[0])
            return self.cls.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(loading, "auto_class", Counted)
    common = ["eval", "--task", "glue/sst2", "--model", str(tiny_bert_dir), "--data", str(sst2_files[1])]
    separate = []
    for path in bert_adapters:
        out = tmp_path / f"one-{path.stem}.json"
        res = runner.invoke(app, common + ["--adapter", str(path), "--output", str(out)])
        assert res.exit_code == 0, res.output
        separate.append(json.loads(out.read_text())["scores"])
    assert len(loads) == 3
    loads.clear()
    res = runner.invoke(app, common + ["--adapter", ",".join(map(str, bert_adapters)), "--output",
                                       str(tmp_path / "many.json")])
    assert res.exit_code == 0, res.output
    assert len(loads) == 1  # one base for three adapters
    summary = json.loads((tmp_path / "many.json").read_text())
    assert summary["base_loads"] == 1 and [d["label"] for d in summary["adapters"]] == ["a", "b", "c"]
    assert [d["scores"] for d in summary["adapters"]] == separate
    assert len({json.dumps(s) for s in separate}) > 1  # the adapters really differ
    for label, scores in zip("abc", separate):
        assert json.loads((tmp_path / f"many.{label}.json").read_text())["scores"] == scores
        assert (tmp_path / f"many.{label}.predictions.jsonl").is_file()


def test_merge_check_reports_the_logit_gap(bert_adapters, tiny_bert_dir, tmp_path):
    def gap(*extra):
        res = runner.invoke(app, ["merge", str(tiny_bert_dir), str(bert_adapters[0]), "-o",
                                  str(tmp_path / f"m{len(extra)}"), "--check", *extra])
        assert res.exit_code == 0, res.output
        match = re.search(r"largest \|merged - unmerged\| logit (\S+) over 4 inputs", res.output)
        assert match, res.output
        return float(match.group(1))

    fp32, bf16 = gap(), gap("--dtype", "bfloat16")
    assert fp32 == 0.0  # the merge writes the very W0 + Pθ the unmerged forward builds
    assert fp32 < bf16 < 0.1  # bf16 weights: visible, still small


def test_adapter_lists_parse(tmp_path):
    from gpart_cli.evaluation.multi import split_adapters

    assert split_adapters(None) is None and split_adapters(str(tmp_path / "a.gpart")) is None
    assert split_adapters("runs/a, runs/b,") == ["runs/a", "runs/b"]
    with pytest.raises(GpartError, match="list two or more adapters"):
        split_adapters("runs/a,")
