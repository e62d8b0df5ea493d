"""The .gpart artifact (docs/design.md §4): contents, round trip, size, and every way a file can be wrong."""

import copy
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import gpart_cli as gpart
from gpart_cli.errors import GpartError
from tests.conftest import tiny_llama, tiny_roberta


def _trained_llama(d=64, hidden=32):
    base = tiny_llama(hidden=hidden)
    model = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=d, seed=3, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(d, generator=torch.Generator().manual_seed(0)))
    return base, model


def test_round_trip_into_a_fresh_base_gives_identical_outputs(tmp_path, tokens):
    base, model = _trained_llama()
    path = gpart.save(model, tmp_path / "a.gpart", recipe={"method": {"d": 64}})
    loaded = gpart.load(copy.deepcopy(base), path)
    assert torch.equal(gpart.theta(loaded), gpart.theta(model))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_metadata_holds_everything_design_lists(tmp_path):
    _, model = _trained_llama()
    path = gpart.save(model, tmp_path / "a.gpart", task={"type": "causal_lm"}, recipe={"k": 1})
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        assert set(f.keys()) == {"theta"}
    assert meta["format"] == "gpart/1" and meta["partition"] == "feistel-v1"
    assert (meta["d"], meta["seed"], meta["isometric"], meta["n_params"]) == (64, 3, True, 2 * (32 * 32 + 16 * 32))  # 2 layers × (q 32×32 + v 16×32, GQA)
    assert meta["targets"][0] == {"name": "model.layers.0.self_attn.q_proj", "shape": [32, 32], "bias": False}
    assert [t["name"].rsplit(".", 1)[-1] for t in meta["targets"]] == ["q_proj", "v_proj"] * 2
    assert meta["base_model"]["fingerprint"].startswith("sha256:") and meta["base_model"]["dtype"] == "float32"
    assert meta["task"] == {"type": "causal_lm", "head_modules": []} and meta["recipe"] == {"k": 1}
    assert set(meta["versions"]) == {"gpart", "torch", "transformers"}


def test_size_for_d_23040_without_head_is_under_100_kb(tmp_path):
    _, model = _trained_llama(d=23_040, hidden=128)
    path = gpart.save(model, tmp_path / "a.gpart")
    assert 23_040 * 4 < path.stat().st_size < 100_000


def test_head_is_stored_and_restored(tmp_path):
    base = tiny_roberta(num_labels=3)
    model = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=16, target_modules=["query", "value"],
                                                               head_modules=["classifier"]))
    with torch.no_grad():
        model.classifier.out_proj.weight.add_(1.0)
    path = gpart.save(model, tmp_path / "a.gpart", task={"type": "sequence_classification", "num_labels": 3})
    art = gpart.read_artifact(path)
    assert sorted(art.head) == ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                                "classifier.out_proj.weight"]
    loaded = gpart.load(copy.deepcopy(base), path)
    assert torch.equal(loaded.classifier.out_proj.weight, model.classifier.out_proj.weight)
    assert art.config.head_modules == ("classifier",)


def test_loading_into_a_model_with_other_shapes_is_an_error(tmp_path):
    _, model = _trained_llama()
    path = gpart.save(model, tmp_path / "a.gpart")
    with pytest.raises(GpartError, match=r"different base.*q_proj: adapter \[32, 32\].*model \[64, 64\]"):
        gpart.load(tiny_llama(hidden=64), path)


def test_loading_into_a_model_without_the_targets_is_an_error(tmp_path):
    _, model = _trained_llama()
    path = gpart.save(model, tmp_path / "a.gpart")
    with pytest.raises(GpartError, match="does not fit this model: no module matches"):
        gpart.load(tiny_roberta(), path)


def _rewrite(path, tmp_path, **changes):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update({k: json.dumps(v) for k, v in changes.items()})
    out = tmp_path / "edited.gpart"
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("changes,message", [
    ({"format": "gpart/9"}, "format 'gpart/9'.*Upgrade gpart"),
    ({"partition": "randperm"}, "partition algorithm 'randperm'"),
    ({"d": 65}, r"tensor 'theta' should be float32 \[65\]"),
    ({"seed": -1}, "'seed' = -1 is not a valid integer"),
    ({"targets": "q_proj"}, "'targets' is not a list"),
])
def test_edited_metadata_is_rejected(tmp_path, changes, message):
    _, model = _trained_llama()
    path = _rewrite(gpart.save(model, tmp_path / "a.gpart"), tmp_path, **changes)
    with pytest.raises(GpartError, match=message):
        gpart.read_artifact(path)


def test_truncated_file_is_rejected(tmp_path):
    _, model = _trained_llama()
    path = gpart.save(model, tmp_path / "a.gpart")
    data = path.read_bytes()
    for cut in (4, 100, len(data) - 10):
        (tmp_path / "t.gpart").write_bytes(data[:cut])
        with pytest.raises(GpartError, match="not a valid .gpart adapter"):
            gpart.read_artifact(tmp_path / "t.gpart")


def test_flipped_header_bytes_are_rejected(tmp_path):
    _, model = _trained_llama()
    data = bytearray(gpart.save(model, tmp_path / "a.gpart").read_bytes())
    data[20] ^= 0xFF  # inside the JSON header
    (tmp_path / "f.gpart").write_bytes(bytes(data))
    with pytest.raises(GpartError, match="not a valid .gpart adapter"):
        gpart.read_artifact(tmp_path / "f.gpart")
    huge = struct.pack("<Q", 1 << 40) + bytes(data[8:])
    (tmp_path / "h.gpart").write_bytes(huge)
    with pytest.raises(GpartError, match="header length"):
        gpart.read_artifact(tmp_path / "h.gpart")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(GpartError, match="nope.gpart does not exist"):
        gpart.read_artifact(tmp_path / "nope.gpart")


def test_save_leaves_no_temp_files_and_overwrites_atomically(tmp_path):
    _, model = _trained_llama()
    gpart.save(model, tmp_path / "a.gpart")
    with torch.no_grad():
        gpart.theta(model).mul_(2)
    gpart.save(model, tmp_path / "a.gpart")
    assert [p.name for p in tmp_path.iterdir()] == ["a.gpart"]
    assert torch.equal(gpart.read_artifact(tmp_path / "a.gpart").theta, gpart.theta(model).detach())


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    from gpart_cli import atomic

    _, model = _trained_llama()
    mask = os.umask(0o022)
    try:
        path = gpart.save(model, tmp_path / "a.gpart")
        with atomic.directory(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_corrupted_theta_is_caught_by_its_checksum(tmp_path):
    """A flipped bit inside theta's bytes leaves a well-formed safetensors file (safetensors checks only the
    header); the sha256 recorded per tensor at save time catches it, and names the tensor."""
    base = tiny_roberta(num_labels=3)
    model = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=16, target_modules=["query", "value"],
                                                               head_modules=["classifier"]))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.arange(16, dtype=torch.float32) / 16)
    path = gpart.save(model, tmp_path / "a.gpart")
    with safe_open(str(path), framework="pt") as f:
        digests = json.loads(f.metadata()["sha256"])
    assert set(digests) == {"theta", "head.classifier.dense.weight", "head.classifier.dense.bias",
                            "head.classifier.out_proj.weight", "head.classifier.out_proj.bias"}
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # tensor bytes follow the header; theta is stored first
    header = json.loads(data[8:start])
    begin, end = header["theta"]["data_offsets"]
    data[start + begin + 4 * 5] ^= 0x01  # the lowest mantissa bit of theta[5]: a value still finite and plausible
    (tmp_path / "c.gpart").write_bytes(bytes(data))
    with safe_open(str(tmp_path / "c.gpart"), framework="pt") as f:  # safetensors itself reads it without complaint
        assert f.get_tensor("theta")[5] != gpart.theta(model)[5]
    with pytest.raises(GpartError, match="not a valid .gpart adapter.*tensor 'theta' does not match its sha256"):
        gpart.read_artifact(tmp_path / "c.gpart")
    with pytest.raises(GpartError, match="tensor 'theta' does not match"):
        gpart.load(copy.deepcopy(base), tmp_path / "c.gpart")


def test_every_metadata_field_is_required(tmp_path):
    """Every key gpart writes must be there on read (no field is optional): a file lacking the checksums or a
    training-time knob is refused as corrupted, naming the field; a checksum list that misses a tensor too."""
    _, model = _trained_llama()
    path = gpart.save(model, tmp_path / "a.gpart")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for key in ("sha256", "dropout", "init_seed", "compute"):
        save_file(tensors, str(tmp_path / "old.gpart"), metadata={k: v for k, v in meta.items() if k != key})
        with pytest.raises(GpartError, match=f"not a valid .gpart adapter \\(metadata lacks {key}\\)"):
            gpart.read_artifact(tmp_path / "old.gpart")
    save_file(tensors, str(tmp_path / "bad.gpart"), metadata={**meta, "sha256": json.dumps({"head.x": "00"})})
    with pytest.raises(GpartError, match="'sha256' does not list one checksum per tensor"):
        gpart.read_artifact(tmp_path / "bad.gpart")
