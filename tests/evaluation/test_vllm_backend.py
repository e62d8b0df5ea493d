"""`gpart eval --backend vllm` against a stand-in `vllm` module at the import boundary: what gpart hands vLLM
(model dir, prompt token ids, greedy sampling parameters), how outputs map back to examples, temp-dir cleanup,
and agreement with the HF backend when the stand-in decodes greedily with transformers."""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.adapters.devices import Precision
from gpart_cli.adapters.reference import open_adapter
from gpart_cli.commands.app import app
from gpart_cli.evaluation import vllm_backend
from gpart_cli.evaluation.generate import MATH_STOPS
from gpart_cli.evaluation.runner import EvalRequest
from gpart_cli.evaluation.tasks import load_task_rows, prompts_for
from tests.conftest import ASSETS

runner = CliRunner()
GSM8K = str(ASSETS / "gsm8k" / "test.jsonl")
REFERENCES = ["18", "3", "70000", "540"]  # GSM8K test[:4]


class FakeVLLM(types.ModuleType):
    """Records every `LLM(...)` and `generate(...)`; `respond(engine, prompt_ids, sampling kwargs)` gives token ids."""

    def __init__(self, respond):
        super().__init__("vllm")
        fake, self.engines = self, []

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                self.kwargs, self.calls = kwargs, []
                self.files = sorted(p.name for p in Path(kwargs["model"]).iterdir())
                fake.engines.append(self)

            def generate(self, prompts, params):
                self.calls.append((prompts, params.kwargs))
                return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=respond(self, p["prompt_token_ids"],
                                                                                   params.kwargs))])
                        for p in prompts]

        self.LLM, self.SamplingParams = LLM, SamplingParams


def hf_greedy(engine, prompt_ids, params):
    """What vLLM computes: greedy tokens from the model dir, ending at the first stop token (kept)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if not hasattr(engine, "model"):
        engine.model = AutoModelForCausalLM.from_pretrained(engine.kwargs["model"]).eval()
    config = GenerationConfig(max_new_tokens=params["max_tokens"], do_sample=False, num_beams=1,
                              eos_token_id=params["stop_token_ids"], pad_token_id=params["stop_token_ids"][0])
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out[0, ids.shape[1]:].tolist()
    stops = [i for i, t in enumerate(new) if t in params["stop_token_ids"]]
    return new[:stops[0] + 1] if stops else new


@pytest.fixture
def install(monkeypatch):
    def put(respond):
        fake = FakeVLLM(respond)
        monkeypatch.setitem(sys.modules, "vllm", fake)
        return fake
    return put


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a 512-token context: GSM8K prompts take ~270 of its tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("llama512")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.max_position_embeddings = 512
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(llama_dir, tmp_path_factory):
    """A .gpart adapter for the tiny Llama whose θ visibly changes what it generates."""
    from transformers import AutoModelForCausalLM

    model = gpart.apply(AutoModelForCausalLM.from_pretrained(llama_dir),
                        gpart.GPartConfig(d=64, seed=1, target_modules=("q_proj", "v_proj", "o_proj")))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(64, generator=torch.Generator().manual_seed(0)) * 2.0)
    return gpart.save(model, tmp_path_factory.mktemp("adapter") / "a.gpart", task={"type": "causal_lm"})


def _eval(tmp_path, *args, name="ev", limit="4"):
    res = runner.invoke(app, ["eval", "--task", "gsm8k", "--data", GSM8K, "--limit", limit, "--max-new-tokens", "7",
                              "--output", str(tmp_path / f"{name}.json"), *args])
    records = []
    if res.exit_code == 0:
        records = [json.loads(x) for x in (tmp_path / f"{name}.predictions.jsonl").read_text().splitlines()]
    return res, records


def test_vllm_gets_the_hf_prompts_and_greedy_parameters_and_answers_map_back(install, adapter, llama_dir,
                                                                            tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    rows = load_task_rows("gsm8k", [GSM8K], None, 4)
    prompts = prompts_for("gsm8k", rows)

    def scripted(engine, prompt_ids, params):
        # Find the example by its prompt; answer the even ones right, then run on into a next question.
        i = prompts.index(tok.decode(prompt_ids, skip_special_tokens=True))
        text = f" The answer is: {REFERENCES[i]}\n\n### Instruction: more" if i % 2 == 0 else " I am not sure."
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    fake = install(scripted)
    res, records = _eval(tmp_path, "--adapter", str(adapter), "--model", str(llama_dir), "--backend", "vllm")
    assert res.exit_code == 0, res.output
    (engine,) = fake.engines
    encoded = tok(prompts)["input_ids"]
    # An adapter saved without a recipe on a CPU machine is scored in float32, and vLLM is told so.
    assert engine.kwargs == {"model": engine.kwargs["model"], "tokenizer": engine.kwargs["model"], "dtype": "float32",
                             "seed": 0, "trust_remote_code": False, "tensor_parallel_size": 1,
                             "max_model_len": max(len(ids) for ids in encoded) + 7}
    # The adapter was merged into a temporary model dir, which is gone afterwards.
    served = Path(engine.kwargs["model"])
    assert served.parent.name.startswith("gpart-vllm-") and not served.parent.exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(engine.files)
    ((sent, params),) = engine.calls
    assert sent == [{"prompt_token_ids": ids} for ids in encoded]  # the HF path's exact token ids
    assert params == {"temperature": 0.0, "max_tokens": 7, "stop": MATH_STOPS, "stop_token_ids": [tok.eos_token_id],
                      "skip_special_tokens": True}
    assert [r["output"] for r in records] == [" The answer is: 18", " I am not sure.", " The answer is: 70000",
                                              " I am not sure."]
    assert [r["reference"] for r in records] == REFERENCES
    doc = json.loads((tmp_path / "ev.json").read_text())
    assert doc["backend"] == "vllm" and doc["scores"]["metamath"] == 0.5 and doc["scores"]["n"] == 4


@pytest.mark.slow
def test_vllm_on_the_merged_adapter_generates_what_the_hf_backend_generates(install, adapter, llama_dir,
                                                                            tmp_path):
    install(hf_greedy)
    model = ["--model", str(llama_dir)]
    _, base = _eval(tmp_path, *model, "--batch-size", "1", name="base")
    res, hf = _eval(tmp_path, "--adapter", str(adapter), *model, "--batch-size", "1", name="hf")
    assert res.exit_code == 0, res.output
    res, vllm = _eval(tmp_path, "--adapter", str(adapter), *model, "--backend", "vllm", name="vllm")
    assert res.exit_code == 0, res.output
    assert [r["output"] for r in base] != [r["output"] for r in hf]  # θ changes the text, so merging is tested
    assert vllm == hf


def test_a_peft_adapter_is_merged_for_vllm_too(install, llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    fake = install(hf_greedy)
    args = ["--adapter", str(tmp_path / "lora"), "--model", str(llama_dir)]
    res, hf = _eval(tmp_path, *args, "--batch-size", "1", name="hf", limit="2")
    assert res.exit_code == 0, res.output
    res, vllm = _eval(tmp_path, *args, "--backend", "vllm", name="vllm", limit="2")
    assert res.exit_code == 0, res.output
    assert vllm == hf and not Path(fake.engines[0].kwargs["model"]).exists()


def test_a_merged_dir_is_served_as_it_is_and_special_stop_strings_stop_by_id(install, llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})  # a chat model's end-of-turn token
    tok.save_pretrained(merged)
    AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(merged)
    fake = install(lambda engine, ids, params: [tok.eos_token_id])
    res, records = _eval(tmp_path, "--adapter", str(merged), "--backend", "vllm", "--tensor-parallel-size", "2",
                         limit="1")
    assert res.exit_code == 0, res.output
    (engine,) = fake.engines
    assert engine.kwargs["model"] == str(merged) and engine.kwargs["tensor_parallel_size"] == 2
    assert engine.calls[0][1]["stop_token_ids"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    assert records[0]["output"] == "" and merged.is_dir()


def test_the_temporary_merge_is_removed_when_decoding_fails(install, adapter, llama_dir):
    def broken(engine, ids, params):
        raise RuntimeError("CUDA out of memory")

    fake = install(broken)
    req = EvalRequest(task="gsm8k", adapter=open_adapter(adapter), model=str(llama_dir), data=[GSM8K], limit=1,
                      max_new_tokens=7, backend="vllm")
    with pytest.raises(RuntimeError, match="out of memory"):
        vllm_backend.run_generation(req, "gsm8k", load_task_rows("gsm8k", [GSM8K], None, 1), req.adapter,
                                    Precision("float32"))
    assert not Path(fake.engines[0].kwargs["model"]).parent.exists()


def test_without_vllm_the_backend_exits_2_with_the_install_command(monkeypatch, adapter, llama_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    res, _ = _eval(tmp_path, "--adapter", str(adapter), "--model", str(llama_dir), "--backend", "vllm")
    assert res.exit_code == 2 and "pip install 'gpart[vllm]'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "ev.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--task", "glue/sst2", "--model", "m", "--backend", "vllm"], "applies to gsm8k, math and mawps"),
    (["--task", "gsm8k", "--predictions", "p.jsonl", "--backend", "vllm"], "drop --backend vllm"),
    (["--task", "gsm8k", "--model", "m", "--backend", "tgi"], "--backend 'tgi' is not one of hf, vllm"),
])
def test_backend_misuse_is_a_user_error(install, args, message):
    install(lambda *a: [])
    res = runner.invoke(app, ["eval", *args])
    assert res.exit_code == 2 and message in " ".join(res.output.split())


def test_prompts_that_do_not_fit_the_context_are_refused_before_vllm_starts(install, llama_dir, tmp_path):
    fake = install(lambda *a: [])
    res, _ = _eval(tmp_path, "--model", str(llama_dir), "--backend", "vllm", "--max-new-tokens", "400", limit="1")
    assert res.exit_code == 2 and "beyond the model's context of 512" in " ".join(res.output.split())
    assert fake.engines == []


# ---------------------------------------------------------------- benchmarks/vllm_check.py

CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm_check.py"
GPU_AND_VLLM = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


@pytest.mark.slow
def test_the_gpu_check_says_what_it_skipped_here():
    if GPU_AND_VLLM:
        pytest.skip("this machine can run the check itself (test_the_gpu_check_finds_hf_and_vllm_agree)")
    res = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ran"] is False and report["skipped"] == "HF vs vLLM generation agreement on GSM8K"
    want = ([] if torch.cuda.is_available() else ["no CUDA device: torch.cuda.is_available() is False"]) + \
        ([] if importlib.util.find_spec("vllm") else ["vLLM is not installed: pip install 'gpart[vllm]'"])
    assert report["why"] == want


@pytest.mark.slow
@pytest.mark.skipif(not GPU_AND_VLLM, reason="needs a CUDA device and vLLM; the CPU twin is "
                                             "test_vllm_on_the_merged_adapter_generates_what_the_hf_backend_generates")
def test_the_gpu_check_finds_hf_and_vllm_agree():
    res = subprocess.run([sys.executable, str(CHECK), "--data", GSM8K, "--n", "20", "--max-new-tokens", "64"],
                         capture_output=True, text=True, timeout=900)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["ran"] and report["agree"], res.stdout + res.stderr[-3000:]


def test_vllm_runs_in_the_precision_the_run_trained_in():
    assert vllm_backend.vllm_dtype(Precision("float32", torch.bfloat16)) == "bfloat16"  # fp32 weights, bf16 autocast
    assert vllm_backend.vllm_dtype(Precision("bfloat16")) == "bfloat16"
    assert vllm_backend.vllm_dtype(Precision("float32")) == "float32"
    assert vllm_backend.vllm_dtype(Precision("auto")) == "auto"  # a plain model on a GPU: its checkpoint's dtype


def test_the_adapter_is_merged_on_the_eval_device_in_vllms_dtype_into_merged_dir(install, adapter, llama_dir,
                                                                                tmp_path, monkeypatch):
    import gpart_cli.adapters.merged_dir as export

    merges, real = [], export.merge_to_dir
    monkeypatch.setattr(export, "merge_to_dir", lambda *a: merges.append(a[3:]) or real(*a))
    fake = install(lambda engine, ids, params: [1])
    out = tmp_path / "kept" / "merged"
    res, _ = _eval(tmp_path, "--adapter", str(adapter), "--model", str(llama_dir), "--backend", "vllm", "--dtype",
                   "bfloat16", "--device", "cpu", "--merged-dir", str(out), limit="1")
    assert res.exit_code == 0, res.output
    assert merges == [("bfloat16", False, torch.device("cpu"))]  # --dtype and --device, not $TMPDIR in float32
    (engine,) = fake.engines
    assert engine.kwargs["model"] == str(out) and engine.kwargs["dtype"] == "bfloat16"
    config = json.loads((out / "config.json").read_text())  # kept after decoding, in the dtype vLLM runs
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    res, _ = _eval(tmp_path, "--adapter", str(adapter), "--model", str(llama_dir), "--backend", "vllm",
                   "--merged-dir", str(out), limit="1")
    assert res.exit_code == 2 and "--merged-dir" in res.output and "already holds files" in res.output


@pytest.mark.parametrize("named", [False, True])
def test_a_merge_that_cannot_fit_on_disk_is_refused_before_it_starts(install, adapter, llama_dir, tmp_path,
                                                                     monkeypatch, named):
    import shutil

    fake = install(lambda engine, ids, params: [1])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=2**20))
    extra = ["--merged-dir", str(tmp_path / "m")] if named else []
    res, _ = _eval(tmp_path, "--adapter", str(adapter), "--model", str(llama_dir), "--backend", "vllm", *extra,
                   limit="1")
    assert res.exit_code == 2 and fake.engines == [] and not (tmp_path / "m").exists()
    message = " ".join(res.output.split())
    from transformers import AutoModelForCausalLM

    count = AutoModelForCausalLM.from_pretrained(llama_dir).num_parameters()
    assert f"about {count * 4 / 2**30:.1f} GiB ({count:,} parameters in float32)" in message
    assert "which has 0.0 GiB free" in message
    hint = "name a --merged-dir on a disk with room" if named else "pass --merged-dir DIR on a disk with room"
    assert hint in message


def test_merged_dir_without_vllm_is_a_user_error(tmp_path, llama_dir):
    res, _ = _eval(tmp_path, "--model", str(llama_dir), "--merged-dir", str(tmp_path / "m"))
    assert res.exit_code == 2 and "--merged-dir names where --backend vllm merges" in " ".join(res.output.split())


def test_the_disk_space_check_counts_a_tied_embedding_once(tmp_path, monkeypatch):
    # Qwen2.5-0.5B's embedding is 27% of its weights, and its output layer is the same tensor: written once.
    import shutil

    from gpart_cli.adapters.loading import ModelSource
    from gpart_cli.errors import GpartError
    from tests.conftest import tiny_qwen2

    model = tiny_qwen2()
    model.save_pretrained(tmp_path / "qwen")
    count = model.num_parameters()
    assert count == sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in model.state_dict().values())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=2**20))
    with pytest.raises(GpartError, match=rf"about 0\.0 GiB \({count:,} parameters in bfloat16\)"):
        vllm_backend.check_disk_space(ModelSource(str(tmp_path / "qwen")), tmp_path / "merged", "bfloat16")
