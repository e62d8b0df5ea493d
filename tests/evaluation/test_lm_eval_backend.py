"""`gpart eval --lm-eval`: lm-evaluation-harness scores the adapted model gpart holds in memory.

A tiny Llama (tokenizer trained in-process) and a 6-question multiple-choice task defined in a local YAML over a
local jsonl: nothing is downloaded. The harness's per-choice log-likelihoods are checked against the adapted model's
own, computed here token by token.
"""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.commands.app import app
from tests.conftest import write_jsonl

runner = CliRunner()
QUESTIONS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples?", "choices": ["5", "6", "1"], "answer": 0},
    {"question": "A box holds 4 pens. How many pens in 2 boxes?", "choices": ["6", "8", "2"], "answer": 1},
    {"question": "She had 10 dollars and spent 7. What is left?", "choices": ["17", "4", "3"], "answer": 2},
    {"question": "How many legs do 3 ducks have?", "choices": ["6", "5"], "answer": 0},
    {"question": "Half of 12 cookies is eaten. How many remain?", "choices": ["24", "6", "10"], "answer": 1},
    {"question": "There are 9 birds and 4 fly away. How many stay?", "choices": ["13", "4", "5"], "answer": 2},
]
TASK_YAML = """task: tiny_math_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def tiny_task(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = write_jsonl(tmp_path / "tiny.jsonl", QUESTIONS)
    (tasks / "tiny_math_mc.yaml").write_text(TASK_YAML.format(data=data))
    return tasks


def _adapter(base_dir, path):
    """A gpart adapter on the tiny Llama with a non-zero theta (so adapted and base scores differ)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = gpart.apply(model, gpart.GPartConfig(d=64, seed=3, target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(64, generator=torch.Generator().manual_seed(0)) * 2.0)
    gpart.save(model, path, task={"type": "causal_lm"}, recipe={"model": {"name_or_path": str(base_dir)}})
    return model.eval()


def _loglikelihoods(model, tokenizer, doc):
    """log P(" " + choice | "Question: ...\\nAnswer:") for each choice, as the harness splits context/continuation."""
    context = f"Question: {doc['question']}\nAnswer:"
    out = []
    for choice in doc["choices"]:
        whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
        n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        out.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(n_ctx, len(whole))))
    return out


@pytest.mark.slow
def test_harness_scores_the_adapted_model_in_memory(tiny_llama_dir, tiny_task, tmp_path):
    adapted = _adapter(tiny_llama_dir, tmp_path / "a.gpart")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    mine = [_loglikelihoods(adapted, tokenizer, q) for q in QUESTIONS]
    theirs_base = [_loglikelihoods(base, tokenizer, q) for q in QUESTIONS]
    expected_acc = sum(max(range(len(ll)), key=ll.__getitem__) == q["answer"] for ll, q in zip(mine, QUESTIONS)) / 6

    out = tmp_path / "lm.json"
    res = runner.invoke(app, ["eval", "--lm-eval", "tiny_math_mc", "--lm-eval-include", str(tiny_task),
                              "--adapter", str(tmp_path / "a.gpart"), "--model", str(tiny_llama_dir),
                              "--batch-size", "4", "--output", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["task"] == "lm-eval" and doc["lm_eval_tasks"] == ["tiny_math_mc"] and doc["backend"] == "lm-eval"
    assert doc["scores"]["tiny_math_mc/acc"] == expected_acc
    assert doc["dtype"] == "float32" and doc["device"] == "cpu"
    records = [json.loads(line) for line in (tmp_path / "lm.predictions.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in records] == list(range(6)) and [r["target"] for r in records] == [0, 1, 2, 0, 1, 2]
    for record, ll, ll_base in zip(records, mine, theirs_base):
        got = [resp[0] for resp in record["responses"]]
        assert got == pytest.approx(ll, abs=1e-4)          # the adapted weights, not the base
        assert max(abs(a - b) for a, b in zip(got, ll_base)) > 1e-2
    assert sum(r["acc"] for r in records) / 6 == expected_acc


@pytest.mark.slow
def test_num_fewshot_reaches_the_harness(tiny_llama_dir, tiny_task, tmp_path):
    res = runner.invoke(app, ["eval", "--lm-eval", "tiny_math_mc", "--lm-eval-include", str(tiny_task),
                              "--model", str(tiny_llama_dir), "--num-fewshot", "2", "--limit", "3",
                              "--output", str(tmp_path / "lm.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "lm.json").read_text())
    assert doc["num_fewshot"] == 2 and doc["limit"] == 3 and doc["adapter"] is None
    records = [json.loads(line) for line in (tmp_path / "lm.predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3
    # two solved examples, then the question: three "Question:" in every prompt
    assert all(r["prompt"].count("Question:") == 3 for r in records)


def test_without_the_harness_the_install_command_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    res = runner.invoke(app, ["eval", "--lm-eval", "arc_easy", "--model", str(tmp_path)])
    assert res.exit_code == 2
    assert "--lm-eval needs lm-evaluation-harness, an optional extra: pip install 'gpart[lm-eval]'" in res.output


def test_flag_combinations_are_refused_before_loading(tmp_path, tiny_task):
    res = runner.invoke(app, ["eval", "--model", str(tmp_path)])
    assert res.exit_code == 2 and "give --task (or --lm-eval TASKS)" in res.output
    res = runner.invoke(app, ["eval", "--task", "gsm8k", "--lm-eval", "arc_easy", "--model", str(tmp_path)])
    assert res.exit_code == 2 and "run them as two commands" in res.output
    res = runner.invoke(app, ["eval", "--lm-eval", "tiny_math_mc", "--lm-eval-include", str(tiny_task),
                              "--model", str(tmp_path), "--data", "x.jsonl", "--backend", "vllm"])
    assert res.exit_code == 2 and "drop --data, --backend" in res.output


def test_tasks_are_looked_up_in_the_include_dirs_first(tiny_task, monkeypatch):
    import lm_eval.tasks

    from gpart_cli.errors import GpartError
    from gpart_cli.evaluation.lm_eval_backend import task_manager

    built = []
    real = lm_eval.tasks.TaskManager

    class Recorded(real):
        def __init__(self, include_path=None, include_defaults=True, **kw):
            built.append(include_defaults)
            # stand-in for the built-in index (a minute to build): the include dir alone
            super().__init__(include_path=include_path, include_defaults=False, **kw)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recorded)
    assert "tiny_math_mc" in task_manager(["tiny_math_mc"], [tiny_task]).all_tasks and built == [False]
    with pytest.raises(GpartError, match="unknown task no_such_task_here; `lm-eval ls tasks`"):
        task_manager(["tiny_math_mc", "no_such_task_here"], [tiny_task])
    assert built == [False, False, True]  # not all in the dir: the built-in index is consulted too
    with pytest.raises(GpartError, match="--lm-eval-include /nope: not a directory"):
        task_manager(["x"], ["/nope"])
