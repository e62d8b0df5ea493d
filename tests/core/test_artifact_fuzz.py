"""Fuzzing the artifact loader: random and mutated bytes raise GpartError, never crash, hang or blow up memory."""

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpart_cli as gpart
from gpart_cli.errors import GpartError
from tests.conftest import tiny_llama

_base = tiny_llama()
_model = gpart.apply(copy.deepcopy(_base), gpart.GPartConfig(d=32, target_modules=["q_proj"]))


def _valid_bytes(tmp_path_factory=None) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return gpart.save(_model, Path(d) / "a.gpart").read_bytes()


VALID = _valid_bytes()
FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load(tmp_path, data: bytes):
    path = tmp_path / "f.gpart"
    path.write_bytes(data)
    try:
        art = gpart.read_artifact(path)
    except GpartError:
        return None
    # Anything accepted must be internally consistent and loadable (or rejected cleanly) by a model.
    assert art.theta.shape == (art.meta["d"],)
    try:
        gpart.load(copy.deepcopy(_base), path)
    except GpartError:
        pass
    return art


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(tmp_path, data):
    _load(tmp_path, data)


@FUZZ
@given(pos=st.integers(0, len(VALID) - 1), value=st.integers(0, 255), cut=st.integers(1, len(VALID)))
def test_mutated_valid_file(tmp_path, pos, value, cut):
    data = bytearray(VALID)
    data[pos] = value
    _load(tmp_path, bytes(data[:cut]))


@FUZZ
@given(length=st.integers(0, 2**64 - 1))
def test_forged_header_length(tmp_path, length):
    assert _load(tmp_path, length.to_bytes(8, "little") + VALID[8:]) is None or length == \
        int.from_bytes(VALID[:8], "little")


def test_unmutated_file_still_loads(tmp_path):
    art = _load(tmp_path, VALID)
    assert art is not None and torch.equal(art.theta, torch.zeros(32))
