"""What `gpart --help`, `gpart COMMAND --help` and `gpart --version` print (issue 30, items 6 and 7)."""

from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.commands.app import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("train", "eval", "sweep-d", "merge", "inspect", "convert", "push")


def _help(*args: str) -> str:
    res = runner.invoke(app, [*args, "--help"])
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())  # one line: the help wraps to the terminal


def test_help_keeps_the_install_extras_and_names_every_task():
    text = _help("eval")
    assert "pip install 'gpart[vllm]'; adapters are merged first" in text  # Rich read [vllm] as markup
    assert "pip install 'gpart[lm-eval]'" in text
    assert "glue/<task>, text_classification/<name>, vision/<dataset>, gsm8k, math" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_no_help_text_loses_a_bracket(command):
    import typer.main

    click_command = typer.main.get_command(app).commands[command]
    helps = [p.help for p in click_command.params if getattr(p, "help", None)]
    text = _help(command)
    for help_text in helps:
        for word in help_text.split():
            if "[" in word:
                assert word in text, word


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output == f"gpart {gpart.__version__}\n"
    assert gpart.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert "--version" in _help()
