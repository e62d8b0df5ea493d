"""gpart's version is pyproject.toml's; dependency floors: pyproject.toml's are what the code calls, and importing gpart
names an outdated one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpart_cli.versions import MINIMUM, OutdatedDependency, __version__, problems, release, require

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [("2.4.0+cu121", (2, 4, 0)), ("4.56.0.dev0", (4, 56, 0)),
                                             ("0.20", (0, 20)), ("5.24.0", (5, 24, 0)), ("2.13.0+cpu", (2, 13, 0))])
def test_release_numbers(text, expected):
    assert release(text) == expected


def test_floors_match_what_the_code_needs():
    assert {k: v[0] for k, v in MINIMUM.items()} == {"torch": "2.4", "transformers": "4.56", "peft": "0.20",
                                                     "datasets": "2.19", "safetensors": "0.4.3", "accelerate": "0.30"}


def test_version_is_pyproject_s():
    assert re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1) == __version__


def test_pyproject_floors_are_the_checked_ones():
    text = (ROOT / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    floors = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', deps))
    assert {name: floors[name] for name in MINIMUM} == {name: v[0] for name, v in MINIMUM.items()}


def test_an_old_package_is_named_with_the_version_and_the_fix():
    installed = {"torch": "2.3.1+cu121", "transformers": "4.46.3", "peft": "0.20.0", "datasets": "3.0.0",
                 "safetensors": "0.4.5", "accelerate": "1.0.0"}
    found = problems(installed.__getitem__)
    assert len(found) == 2
    assert found[0].startswith("torch 2.3.1+cu121 is installed but gpart needs torch>=2.4 (torch.get_autocast_dtype")
    assert "transformers 4.46.3 is installed but gpart needs transformers>=4.56 (from_pretrained(dtype=...)" \
           in found[1] and found[1].endswith("pip install -U 'transformers>=4.56'")
    with pytest.raises(OutdatedDependency, match="gpart cannot run with these packages"):
        require(installed.__getitem__)


def test_this_environment_passes():
    assert problems() == []


@pytest.mark.slow
def test_importing_gpart_with_an_old_transformers_fails_with_the_message(tmp_path):
    """A real import: a distribution record of transformers 4.46.0 earlier on sys.path than the installed one."""
    info = tmp_path / "transformers-4.46.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 4.46.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", "import gpart_cli"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode != 0
    assert "OutdatedDependency: gpart cannot run with these packages" in done.stderr
    assert "transformers 4.46.0 is installed but gpart needs transformers>=4.56" in done.stderr
