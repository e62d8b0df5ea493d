"""The Hugging Face Hub: `gpart push` publishes a run, `hf://user/name` names a published adapter.

`push` uploads the run's result (adapter.gpart, or a PEFT adapter/ dir), recipe.yaml, results.json and a model card
(`huggingface_hub.ModelCard`: base_model, library_name gpart, tags, the results table, how to load and merge) in
one commit. `fetch` turns an adapter on the Hub into a local path: `hf://user/name[@revision]`, or a bare
`user/name` that reads as no local path, is fetched with `hf_hub_download` (cached; offline once cached).
Every Hub failure becomes a `GpartError` that names the fix (log in, unset HF_HUB_OFFLINE, check the name).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import yaml

from ..errors import GpartError, first_line
from .loading import FAMILY_TASK_TYPE

PREFIX = "hf://"
ADAPTER_FILE = "adapter.gpart"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "gpart_run.json")  # a lora / unilora adapter/
RUN_FILES = ("recipe.yaml", "results.json")
LOGIN = "log in with `hf auth login` (older clients: `huggingface-cli login`) or set HF_TOKEN"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_PIPELINE = {"sequence_classification": "text-classification", "causal_lm": "text-generation",
             "image_classification": "image-classification"}

CARD = """
# {{ repo }}

A [GPart](https://arxiv.org/abs/2605.14841) adapter
{%- if base %} for [{{ base }}](https://huggingface.co/{{ base }})
{%- elif base_local %} for `{{ base_local }}`{% endif %},
trained with [gpart](https://pypi.org/project/gpart/) on {{ task }}
({{ method }}{% if d %}, one vector θ of d = {{ d }} values{% endif %}; {{ params }} trainable parameters,
{{ steps }} steps).

## Results

| metric | before | after |
|---|---:|---:|
{% for name, before, after in rows %}| {{ name }} | {{ before }} | {{ after }} |
{% endfor %}
Scores on the recipe's eval split (`results.json`): "before" is the model as training started, "after" the adapter.

## Use it

```bash
pip install gpart
gpart eval --task {{ eval_task }} --adapter hf://{{ repo }}{% if not base %} --model BASE_MODEL{% endif %}
gpart merge {{ base or "BASE_MODEL" }} hf://{{ repo }} -o merged/    # a plain transformers model dir
gpart inspect hf://{{ repo }}
```
{% if adapter_file %}
In Python:

```python
import gpart_cli as gpart
from huggingface_hub import hf_hub_download
from transformers import {{ auto_class }}

model = {{ auto_class }}.from_pretrained("{{ base or "BASE_MODEL" }}"
{%- if num_labels %}, num_labels={{ num_labels }}{% endif %})
model = gpart.load(model, hf_hub_download("{{ repo }}", "adapter.gpart"))   # W = W0 + Pθ, computed on the fly
merged = gpart.merge(model)                                                  # or fold it into the weights
```
{% endif %}
The full training recipe is `recipe.yaml` in this repo: `gpart train recipe.yaml` reproduces the run.
"""

_AUTO_CLASS = {"sequence_classification": "AutoModelForSequenceClassification", "causal_lm": "AutoModelForCausalLM",
               "image_classification": "AutoModelForImageClassification"}


def offline_switch() -> str | None:
    """The environment setting that switches the Hub off, as `NAME=value` (huggingface_hub reads HF_HUB_OFFLINE,
    and TRANSFORMERS_OFFLINE when HF_HUB_OFFLINE is unset), or None when neither does."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return None
    name = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    return f"{name}={os.environ.get(name, '1')}"


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a Hub request that got no answer: no network, no DNS, refused, timed out (raised by
    the HTTP client huggingface_hub uses: httpx, its httpx2 fork, or requests in older versions)."""
    kinds: list = [ConnectionError, TimeoutError, socket.gaierror]
    for module, names in (("httpx", ("TransportError",)), ("httpx2", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            found = importlib.import_module(module)
        except ImportError:
            continue
        kinds += [getattr(found, name) for name in names if hasattr(found, name)]
    return tuple(kinds)


@contextlib.contextmanager
def hub_errors(what: str, repo: str, fix: str = "pass a local adapter file"):
    """Turn huggingface_hub's failures while doing `what` with `repo` into GpartErrors that say what to do; `fix` is
    the way around the Hub when it cannot be reached."""
    from huggingface_hub import errors

    try:
        yield
    except errors.OfflineModeIsEnabled:
        switch = offline_switch() or "HF_HUB_OFFLINE=1"
        raise GpartError(f"{what} {repo}: the Hugging Face Hub is switched off ({switch}); unset "
                         f"{switch.split('=')[0]} to reach it") from None
    except errors.LocalEntryNotFoundError:
        switch = offline_switch()
        why, unset = ((f"is switched off ({switch})", f"unset {switch.split('=')[0]}") if switch else
                      ("could not be reached", "check the network connection"))
        raise GpartError(f"{what} {repo}: not in the local Hugging Face cache, and the Hub {why}: {unset}, or "
                         f"{fix}") from None
    except errors.RevisionNotFoundError:
        raise GpartError(f"{what} {repo}: the Hub repo has no such revision; check the part after @") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError):
        raise GpartError(f"{what} {repo}: no such Hub model repo, or it is private or gated: check the name, or "
                         f"{LOGIN}") from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        fix = LOGIN + " with a token that may write to it" if status in (401, 403) else "check the repo id and retry"
        raise GpartError(f"{what} {repo}: the Hub answered {first_line(e)}; {fix}") from None
    except _network_errors() as e:
        from huggingface_hub import constants

        raise GpartError(f"{what} {repo}: could not reach the Hugging Face Hub at {constants.ENDPOINT} "
                         f"({type(e).__name__}: {first_line(e)}); check the network connection (and HTTPS_PROXY / "
                         f"HF_ENDPOINT if you use them), or {fix}") from None


# ---- push ------------------------------------------------------------------------------------------------
def _result(run: Path, results: dict) -> Path:
    """The run's result to upload: adapter.gpart or a PEFT adapter/ dir (full models are not adapters)."""
    if (run / ADAPTER_FILE).is_file():
        return run / ADAPTER_FILE
    if (run / "adapter" / "adapter_config.json").is_file():
        return run / "adapter"
    raise GpartError(f"{run} holds no adapter ({ADAPTER_FILE} or adapter/); method {results.get('method')!r} "
                     f"saves a whole model, which gpart push does not upload: use `huggingface-cli upload` on "
                     f"{run / 'model'}")


def _read_run(run: Path) -> tuple[dict, dict]:
    """(results.json, recipe.yaml) of a finished run dir."""
    if not (run / "results.json").is_file() or not (run / "recipe.yaml").is_file():
        raise GpartError(f"{run} is not a finished gpart run dir (no results.json / recipe.yaml); pass the "
                         f"--output dir of a `gpart train` that completed")
    return json.loads((run / "results.json").read_text()), yaml.safe_load((run / "recipe.yaml").read_text())


def hub_base(name: str | None) -> str | None:
    """The base model as a Hub id for the card's base_model, or None for a local dir or pkg: model."""
    if not name or name.startswith(("pkg:", "/", ".", "~")) or Path(name).exists():
        return None
    return name if _REPO_ID.fullmatch(name) and "@" not in name else None


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def model_card(repo: str, results: dict, recipe: dict, adapter_file: bool, num_labels: int | None = None):
    """The model card of a pushed run: Hub metadata and a README with the results table and usage."""
    from huggingface_hub import ModelCard, ModelCardData

    model, method, data = recipe.get("model") or {}, recipe.get("method") or {}, recipe.get("data") or {}
    base = hub_base(model.get("name_or_path"))
    task_type = FAMILY_TASK_TYPE.get(data.get("family"), "causal_lm")
    before, after = results.get("before") or {}, results.get("after") or {}
    rows = [(k, _fmt(before.get(k)), _fmt(after.get(k))) for k in (after or before)]
    tags = ["gpart", "peft", method.get("name") or "gpart", data.get("family") or "", results.get("task") or ""]
    data_card = ModelCardData(base_model=base, library_name="gpart", pipeline_tag=_PIPELINE[task_type],
                              tags=[t for t in dict.fromkeys(tags) if t])
    eval_task = (recipe.get("eval") or {}).get("task") or \
        (results.get("task") if data.get("family") != "sft" else None) or "TASK"  # sft/NAME is no eval task
    return ModelCard.from_template(data_card, template_str="---\n{{ card_data }}\n---\n" + CARD, repo=repo,
                                   base=base, base_local=None if base else model.get("name_or_path"),
                                   task=results.get("task"), method=method.get("name"),
                                   d=f"{method['d']:,}" if method.get("name") == "gpart" and method.get("d") else None,
                                   params=f"{results.get('trainable_params', 0):,}", steps=results.get("steps"),
                                   rows=rows, eval_task=eval_task, adapter_file=adapter_file,
                                   auto_class=_AUTO_CLASS[task_type], num_labels=num_labels)


def push(run: str | Path, repo: str, private: bool = False) -> str:
    """Upload a finished run to the Hub model repo `repo` (created when missing); returns the repo URL."""
    from huggingface_hub import HfApi, get_token

    run = Path(run)
    if not _REPO_ID.fullmatch(repo) or "@" in repo:
        raise GpartError(f"--repo {repo!r} should be a Hub repo id: user/name or org/name")
    results, recipe = _read_run(run)
    result = _result(run, results)
    num_labels = None
    if result.name == ADAPTER_FILE:
        from ..core.artifact import read_artifact

        num_labels = (read_artifact(result).meta.get("task") or {}).get("num_labels")
    card = model_card(repo, results, recipe, adapter_file=result.name == ADAPTER_FILE, num_labels=num_labels)
    if get_token() is None:
        raise GpartError(f"gpart push {repo}: no Hugging Face token; {LOGIN}")
    api = HfApi()
    offline = "run gpart push again where the Hub can be reached"
    with hub_errors("gpart push", repo, offline), tempfile.TemporaryDirectory(prefix="gpart-push-") as tmp:
        staged = Path(tmp)
        if result.is_dir():
            shutil.copytree(result, staged / result.name)
        else:
            shutil.copy2(result, staged / result.name)
        for name in RUN_FILES:
            shutil.copy2(run / name, staged / name)
        card.save(staged / "README.md")
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=staged, repo_type="model",
                          commit_message=f"gpart push: {results.get('method')} on {results.get('task')}")
    return str(url)


# ---- resolving --adapter ---------------------------------------------------------------------------------
_PATH_SUFFIXES = (".gpart", ".safetensors", ".json")


def is_hub_ref(text: str) -> bool:
    """True for hf://user/name, and for a bare user/name[@revision] that does not read as a local path: one that
    exists, starts with . / or ~, ends like a file, or whose first folder exists here (runs/typo is a path)."""
    if text.startswith(PREFIX):
        return True
    path = Path(text)
    path_like = path.exists() or text.startswith((".", "/", "~")) or text.endswith(_PATH_SUFFIXES) \
        or Path(text.split("/", 1)[0]).is_dir()
    return not path_like and _REPO_ID.fullmatch(text) is not None


def download(spec: str, option: str = "--adapter") -> Path:
    """The local cached path of the adapter in the Hub repo `user/name[@revision]`: its adapter.gpart, or the dir of
    a PEFT adapter/ pushed from a lora or unilora run."""
    from huggingface_hub import errors, hf_hub_download

    # Not in the repo (a RemoteEntryNotFoundError; older clients raise EntryNotFoundError) as opposed to not in the
    # cache while offline (LocalEntryNotFoundError, a subclass of EntryNotFoundError in every version).
    remote_missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    repo, _, revision = spec.partition("@")
    with hub_errors(option, PREFIX + spec):
        try:
            return Path(hf_hub_download(repo, ADAPTER_FILE, revision=revision or None))
        except remote_missing as e:
            if isinstance(e, errors.LocalEntryNotFoundError):
                raise
        try:
            paths = [Path(hf_hub_download(repo, f"adapter/{name}", revision=revision or None)) for name in PEFT_FILES]
        except remote_missing as e:
            if isinstance(e, errors.LocalEntryNotFoundError):
                raise
            raise GpartError(f"{option} {PREFIX}{spec}: the Hub repo holds neither {ADAPTER_FILE} nor a PEFT "
                             f"adapter/ dir; push a run with `gpart push RUN --repo {repo}`") from None
    return paths[0].parent


def fetch(text: str, option: str = "--adapter") -> Path:
    """The local cached path of the Hub adapter `text` names (hf://user/name[@revision] or a bare user/name)."""
    spec = text.removeprefix(PREFIX)
    if not _REPO_ID.fullmatch(spec):
        raise GpartError(f"{option} {text}: a Hub adapter is hf://user/name or hf://user/name@revision")
    try:
        return download(spec, option)
    except GpartError as e:
        if text.startswith(PREFIX):
            raise
        raise GpartError(f"{option} {text}: no such local file or dir, and as a Hub repo: {e}") from None
