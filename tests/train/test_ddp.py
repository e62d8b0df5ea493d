"""Multi-process training on CPU (gloo) under torchrun: DDP and FSDP runs of 2 and 3 processes, and a 2-node launch,
each ending at the single-process θ (fp tolerance) on the same global batches, with rank 0 writing the same files.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.commands.app import app
from gpart_cli.recipe.schema import from_dict
from tests.conftest import ASSETS, glue_recipe, interrupt_training_at

pytestmark = pytest.mark.slow
runner = CliRunner()


ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "COLUMNS": "400"}  # Rich wraps console lines at 80 columns without a terminal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, args: list[str], nodes: int = 1, node_rank: int = 0, port: int | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node_rank),
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port or _free_port()),
           "-m", "gpart_cli", "train", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def torchrun_script(source: str, path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """Write `source` to `path` and run it under torchrun on 2 gloo processes (stdout and stderr captured); with `ok`,
    fail the test on a non-zero exit."""
    path.write_text(source)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), str(path), *map(str, args)],
                         capture_output=True, text=True, timeout=300, env={**ENV, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 or not ok, res.stderr[-3000:]
    return res


def torchrun(nproc: int, recipe, out, *extra: str) -> str:
    """Run `gpart train` under torchrun; returns stderr (the console), failing the test on a non-zero exit."""
    proc = _launch(nproc, [str(recipe), "--output", str(out), *extra])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err


def single(recipe, out, *extra: str) -> None:
    res = subprocess.run([sys.executable, "-m", "gpart_cli", "train", str(recipe), "--output", str(out), *extra],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]


def assert_same_adapter(got_dir, want_dir, overridden=("distributed",)):
    got, want = (gpart.read_artifact(d / "adapter.gpart") for d in (got_dir, want_dir))
    assert torch.count_nonzero(want.theta) > 0
    torch.testing.assert_close(got.theta, want.theta, rtol=1e-4, atol=1e-6)
    assert sorted(got.head) == sorted(want.head)
    for name in want.head:
        torch.testing.assert_close(got.head[name], want.head[name], rtol=1e-4, atol=1e-6)
    # Rank 0 alone wrote, in the single-process format: the same metadata, one log line per logged step.
    for meta in (got.meta, want.meta):
        del meta["versions"], meta["sha256"]  # the checksums follow the tensors, compared with a tolerance above
        for key in overridden:  # train.* fields the multi-process run set with --set
            del meta["recipe"]["train"][key]
    assert got.meta == want.meta
    logs = [(got_dir / "metrics.jsonl").read_text().splitlines(), (want_dir / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(x)["step"] for x in logs[0]] == [json.loads(x)["step"] for x in logs[1]]
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        a, b = (load_file(str(d / "checkpoints" / "last" / name)) for d in (got_dir, want_dir))
        others = {k for k in a if k.startswith("rng.rank.")} - set(b)  # the generator state of ranks but 0
        assert {k: v.shape for k, v in a.items() if k not in others} == {k: v.shape for k, v in b.items()}
        assert all(a[k].shape == b["rng.rank.0.device"].shape for k in others)


# ---------------------------------------------------------------- GLUE (a classification head trains beside θ)


def _without_dropout(model_dir, out):
    # Dropout masks come from each process's own RNG stream: with them the runs could not agree.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, hidden_dropout_prob=0.0,
                                                               attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def glue(tiny_bert_dir, sst2_files, tmp_path_factory):
    """(recipe file, single-process run dir): 72 train rows in micro-batches of 8, 2 per step, 6 steps.

    ΔW dropout is on: its masks are keyed by the global micro-batch, so every world size must draw the same ones.
    """
    tmp = tmp_path_factory.mktemp("glue")
    model_dir = _without_dropout(tiny_bert_dir, tmp / "model")
    cfg = glue_recipe(model_dir, sst2_files, train__max_steps=6, train__eval_before=False, train__grad_accum=2,
                      method__dropout=0.1)
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    single(recipe, tmp / "one")
    return recipe, tmp / "one"


def test_two_process_ddp_matches_single_process(glue, tmp_path):
    recipe, one = glue
    err = torchrun(2, recipe, tmp_path / "two")
    assert "× 2 processes (ddp)" in err
    assert_same_adapter(tmp_path / "two", one)


# `gpart train ...` in which rank 1 alone gets a Ctrl-C as its step 3 starts (a terminal sends it to every process;
# a scheduler may signal one).
SIGNAL_RANK_1 = """
import os, signal, sys
from gpart_cli.commands.app import main
from gpart_cli.train.trainer import Trainer

step = Trainer._train_step

def signalled(self, s):
    if s == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGINT)
    return step(self, s)

Trainer._train_step = signalled
sys.argv = ["gpart", "train", *sys.argv[1:]]
main()
"""


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(glue, tmp_path):
    recipe, one = glue
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(recipe), "--output", str(tmp_path / "cut")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode != 0 and "exitcode  : 130" in proc.stderr, proc.stderr[-3000:]  # both ranks, no hang
    assert "interrupted: checkpoint at step 3/6. Resume with:" in proc.stderr  # rank 0 stopped where rank 1 did
    assert json.loads((tmp_path / "cut" / "checkpoints" / "last" / "state.json").read_text())["step"] == 3
    torchrun(2, tmp_path / "cut" / "recipe.yaml", tmp_path / "cut", "--resume")
    assert_same_adapter(tmp_path / "cut", one)


def test_three_processes_split_micro_batches_unevenly(glue, tmp_path):
    # 8 rows over 3 ranks: shares of 2, 3 and 3 rows, each weighted by its rows.
    recipe, one = glue
    torchrun(3, recipe, tmp_path / "three")
    assert_same_adapter(tmp_path / "three", one)


def test_fsdp_keeps_theta_and_the_head_whole_and_matches_single_process(glue, tmp_path):
    recipe, one = glue
    err = torchrun(2, recipe, tmp_path / "fsdp", "--set", "train.distributed=fsdp")
    assert "× 2 processes (fsdp)" in err
    assert_same_adapter(tmp_path / "fsdp", one)
    # Every rank evaluated together (FSDP forwards are collective); rank 0 wrote the same scores.
    want, got = (json.loads((d / "results.json").read_text()) for d in (one, tmp_path / "fsdp"))
    assert got["after"] == want["after"] and got["best_dev"] == pytest.approx(want["best_dev"])


def test_fsdp_trains_lora_like_single_process(glue, tmp_path):
    recipe, _ = glue
    lora = yaml.safe_load(recipe.read_text())
    lora["method"].update(name="lora", rank=4)
    lora["train"].update(lr_theta=1e-3, max_steps=3)
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump(lora))
    single(recipe, tmp_path / "one")
    torchrun(2, recipe, tmp_path / "two", "--set", "train.distributed=fsdp")
    want, got = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert sorted(got) == sorted(want) and any(torch.count_nonzero(v) for k, v in want.items() if "lora_B" in k)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- SFT on a tiny Llama (loss over label tokens)


@pytest.fixture(scope="module")
def sft(tiny_llama_dir, tmp_path_factory):
    """(recipe file, single-process run dir): 18 train rows, micro-batches 4, 4, 4, 4, 2; 2 per step, 5 steps."""
    gsm = ASSETS / "gsm8k"
    raw = {"model": {"name_or_path": str(tiny_llama_dir)},
           "method": {"name": "gpart", "d": 96, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
           "data": {"family": "sft", "task": "gsm8k", "train_files": [str(gsm / "train.jsonl")],
                    "query_column": "question", "response_column": "answer", "max_train_samples": 22,
                    "dev_samples": 4, "max_length": 320},
           "train": {"max_steps": 5, "batch_size": 4, "grad_accum": 2, "lr_theta": 1e-2, "eval_before": False,
                     "log_every": 1, "eval_every": 2, "distributed": "fsdp"},
           "eval": {"task": "gsm8k", "files": [str(gsm / "test.jsonl")], "limit": 2, "max_new_tokens": 4},
           "name": "s"}
    tmp = tmp_path_factory.mktemp("sft")
    recipe = tmp / "sft.yaml"
    recipe.write_text(yaml.safe_dump(from_dict(raw).to_dict()))
    single(recipe, tmp / "one")
    assert json.loads((tmp / "one" / "results.json").read_text())["after"]["n"] == 2
    return recipe, tmp / "one"


def test_fsdp_two_processes_match_single_process_and_the_adapter_merges(sft, tiny_llama_dir, tmp_path):
    recipe, one = sft
    err = torchrun(2, recipe, tmp_path / "two")
    assert "× 2 processes (fsdp)" in err
    assert_same_adapter(tmp_path / "two", one)
    # Generation is left to `gpart eval` (decoding a sharded model would all-gather it for every token).
    assert f"gpart eval --task gsm8k --adapter {tmp_path / 'two'} --backend vllm" in err
    assert json.loads((tmp_path / "two" / "results.json").read_text())["after"] is None
    # The adapter merges like any other: the merged dir gives the logits of base + adapter.
    res = runner.invoke(app, ["merge", str(tiny_llama_dir), str(tmp_path / "two" / "adapter.gpart"), "-o",
                              str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = gpart.load(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "two" / "adapter.gpart")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits)


def test_ddp_shares_the_generation_eval_and_scores_as_one_process(sft, tmp_path):
    # Every rank decodes its batches of the GSM8K eval (before and after training); rank 0 writes the scores.
    recipe, one = sft
    torchrun(2, recipe, tmp_path / "ddp", "--set", "train.distributed=ddp", "--set", "train.eval_before=true")
    assert_same_adapter(tmp_path / "ddp", one, overridden=("distributed", "eval_before"))
    got, want = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "ddp", one))
    assert got["after"] == want["after"] and got["after"]["n"] == 2 and got["before"]["n"] == 2
    assert (tmp_path / "ddp" / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()


def test_fsdp_three_processes_with_uneven_and_empty_shares_and_checkpointing(sft, tmp_path):
    # 3 ranks split each micro-batch: 4 rows -> 1, 1, 2; the epoch's last 2 rows -> 0 (weight 0), 1, 1.
    recipe, one = sft
    torchrun(3, recipe, tmp_path / "three", "--set", "train.gradient_checkpointing=true")
    assert_same_adapter(tmp_path / "three", one, overridden=("distributed", "gradient_checkpointing"))


def test_fsdp_on_an_int8_base_keeps_the_quantized_weights_whole_and_matches_single_process(sft, tmp_path):
    recipe, _ = sft
    # bitsandbytes' CPU backend (slow: 2 steps); nf4 takes the same path on GPUs
    int8 = ("--set", "model.quantization=int8", "--set", "train.max_steps=2")
    single(recipe, tmp_path / "one", *int8)
    torchrun(2, recipe, tmp_path / "two", *int8)
    assert_same_adapter(tmp_path / "two", tmp_path / "one", overridden=("distributed", "max_steps"))


def test_two_node_fsdp_resumes_a_run_without_a_shared_run_dir(sft, tmp_path, monkeypatch):
    """Cut a one-process run at step 3, resume it on 2 "nodes": node 1's --output is empty (no shared disk)."""
    recipe, one = sft
    interrupt_training_at(monkeypatch, 3)
    assert runner.invoke(app, ["train", str(recipe), "--output", str(tmp_path / "cut")]).exit_code == 130
    port = _free_port()
    nodes = [_launch(1, [str(tmp_path / "cut" / "recipe.yaml"), "--output", str(tmp_path / out), "--resume"],
                     nodes=2, node_rank=rank, port=port) for rank, out in ((0, "cut"), (1, "elsewhere"))]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert_same_adapter(tmp_path / "cut", one)
    assert not (tmp_path / "elsewhere").exists()


RANK0_FILES = """
import os
import torch.distributed as dist
from gpart_cli.errors import GpartError
from gpart_cli.train import distributed

distributed.world()
def unreadable():
    raise GpartError("checkpoint X is unreadable")
try:
    distributed.from_rank0(unreadable)
except GpartError as e:
    os.write(1, f"{dist.get_rank()} error: {e}\\n".encode())  # one write: the ranks share stdout
files = distributed.from_rank0(lambda: {"a": b"hello", "empty": b"", "bytes": bytes(range(256))})
assert files == {"a": b"hello", "empty": b"", "bytes": bytes(range(256))}, files
assert distributed.from_rank0(dict) == {}
os.write(1, f"{dist.get_rank()} ok\\n".encode())
distributed.shutdown()
"""


def test_files_read_on_rank_0_reach_every_rank_and_so_do_its_errors(tmp_path):
    res = torchrun_script(RANK0_FILES, tmp_path / "rank0_files.py")
    lines = sorted(res.stdout.splitlines())
    assert lines == ["0 error: checkpoint X is unreadable", "0 ok",
                     "1 error: rank 0 could not read the checkpoint; see its error message above", "1 ok"]


SHARDED_GENERATION = """
import json, os, sys
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
import gpart_cli as gpart
from gpart_cli.evaluation.tasks import load_task_rows, run_generation
from gpart_cli.train import distributed

rank, world = distributed.world()
model = gpart.apply(AutoModelForCausalLM.from_pretrained(sys.argv[1]),
                    gpart.GPartConfig(d=64, target_modules=("q_proj", "v_proj")))
with torch.no_grad():
    gpart.theta(model).copy_(torch.randn(64, generator=torch.Generator().manual_seed(0)))
tok = AutoTokenizer.from_pretrained(sys.argv[1])
rows = load_task_rows("gsm8k", [sys.argv[2]], None, 7)  # batches of 2: 4 batches, 2 per rank, the last of 1 row
got = run_generation("gsm8k", model, tok, rows, 2, 6, part=(rank, world))
os.write(1, (json.dumps({"rank": rank, "got": got}) + "\\n").encode())
if rank == 0:
    os.write(1, (json.dumps({"alone": run_generation("gsm8k", model, tok, rows, 2, 6)}) + "\\n").encode())
distributed.shutdown(ok=True)
"""


def test_generation_eval_is_shared_out_over_the_ranks_and_scores_as_one_process(tiny_llama_dir, tmp_path):
    res = torchrun_script(SHARDED_GENERATION, tmp_path / "sharded_generation.py", tiny_llama_dir,
                          ASSETS / "gsm8k" / "test.jsonl")
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    alone = next(line["alone"] for line in lines if "alone" in line)
    ranks = [line["got"] for line in lines if "got" in line]
    assert len(ranks) == 2 and alone[0]["n"] == 7
    assert ranks[0] == ranks[1] == alone  # the same scores and per-example outputs on every rank
    assert len({r["output"] for r in alone[1]}) > 1  # the outputs differ: a mix-up of rows would show
