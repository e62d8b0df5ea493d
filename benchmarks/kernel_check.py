"""GPU checks of the Triton kernels (issue 11): what CI's CPU interpreter cannot show.

    python benchmarks/kernel_check.py            # on a CUDA machine: every check below, then timings
    python benchmarks/kernel_check.py --quick    # checks only, no timings

On CUDA it runs, compiled:
- selfcheck: the per-class self-check gpart runs on first use (build, grad, ids; fp32/bf16/fp16; dropout;
  deterministic), so a kernel that would fall back on this GPU shows up here;
- kernels: W0 + ΔW bit-exact against torch, ∂L/∂θ against an fp64 reference per dtype, fp32 at full precision
  unless TF32 is allowed, row offsets past 2**31 elements;
- layer: a small Llama on the kernel path against the reference path (outputs, ∂L/∂θ, 0 B/param), bf16 and fp32;
- determinism: two short training runs with `train.deterministic: true` give bit-equal θ (and whether the
  default atomics differ, for information);
- multi_gpu (2+ GPUs): layers split over cuda:0/cuda:1 give the single-device θ gradient;
- timings: one 4096-wide layer, fwd+bwd: kernel path, reference path, dense floor, deterministic reduction.
On a machine without CUDA it prints what it skipped and exits 0 (CI runs it). One JSON object on stdout,
a summary on stderr; exit code 1 if any check failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

# Before CUDA starts: cuBLAS reads its workspace setting once, and the determinism check needs it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_TOL = {"fp32": 1e-5, "bf16": 1e-5, "fp16": 1e-5}  # products exact after the upcast; fp32 accumulation


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _ids(n, d, seed, start, count, device):
    from gpart_cli.partition.feistel import group_ids

    return group_ids(n, d, seed, start, count, device=device).long()


def check_selfcheck(device) -> dict:
    """The self-check gpart runs on first use, for every class a bf16/fp16/fp32 model would hit."""
    from gpart_cli.kernels import triton_gpart
    from gpart_cli.kernels.launch import dot_precision
    from gpart_cli.kernels.selfcheck import BuildCall, GradCall, IdsCall, run_check

    n, d, seed = 3 * 4096 * 4096, 65_536, 0
    verdicts = {}
    for name, dtype in DTYPES.items():
        for dropout in (False, True):
            verdicts[f"build {name} dropout={dropout}"] = run_check(
                BuildCall(device, dtype, True, dropout, 4096 * 4096, 4096 * 4096, n, d, seed), triton_gpart)
            for deterministic in (False, True):
                call = GradCall(device, dtype, False, dropout, deterministic, dot_precision(dtype, device)[0],
                                8192, 4096, 4096, 4096 * 4096, n, d, seed)
                verdicts[f"grad {name} dropout={dropout} deterministic={deterministic}"] = run_check(call, triton_gpart)
        verdicts[f"delta {name}"] = run_check(BuildCall(device, dtype, False, False, 0, 4096 * 4096, n, d, seed),
                                              triton_gpart)
    verdicts["ids"] = run_check(IdsCall(device, 5, 4096, n, d, seed), triton_gpart)
    # The authors' stateless partition (uint64 arithmetic in the kernels), with a seed >= 2**63.
    split = "splitmix64-mod-v1"
    verdicts["splitmix build bf16"] = run_check(BuildCall(device, torch.bfloat16, True, False, 4096 * 4096,
                                                          4096 * 4096, n, d, 2**63 + 5, split), triton_gpart)
    verdicts["splitmix grad bf16 deterministic"] = run_check(GradCall(
        device, torch.bfloat16, False, False, True, dot_precision(torch.bfloat16, device)[0], 8192, 4096, 4096,
        4096 * 4096, n, d, 2**63 + 5, split), triton_gpart)
    verdicts["splitmix ids"] = run_check(IdsCall(device, 2**33 + 5, 4096, n, d, 2**63 + 5, split), triton_gpart)
    failed = {k: v for k, v in verdicts.items() if v is not None}
    return {"ok": not failed, "classes": len(verdicts), "failed": failed}


def check_kernels(device) -> dict:
    from gpart_cli.kernels.triton_gpart import build_weight, grad_from_gemm

    n, d, seed, start = 10_000_000, 4099, 3, 12_345
    g = torch.Generator().manual_seed(0)
    out = {"ok": True}
    for name, dtype in DTYPES.items():
        w = torch.randn(1000, 1200, generator=g).to(device, dtype)
        theta = torch.randn(d, generator=g).to(device)
        ref = (w.float() + theta[_ids(n, d, seed, start, w.numel(), device)].view_as(w)).to(dtype)
        exact = bool(torch.equal(build_weight(w, theta, start, n, d, seed), ref))
        gy = torch.randn(2000, 1000, generator=g).to(device, dtype)
        x = torch.randn(2000, 1200, generator=g).to(device, dtype)
        truth = torch.zeros(d, dtype=torch.float64, device=device).index_add_(
            0, _ids(n, d, seed, start, 1000 * 1200, device), (gy.double().t() @ x.double()).reshape(-1))
        grad = torch.zeros(d, device=device)
        grad_from_gemm(grad, gy, x, start, n, d, seed, False)
        err = _rel(grad, truth)
        out[name] = {"build_bit_exact": exact, "grad_rel_err": err}
        out["ok"] &= exact and err < GRAD_TOL[name]
    allow = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        gy, x = torch.randn(2000, 1000, device=device), torch.randn(2000, 1200, device=device)
        truth = torch.zeros(d, dtype=torch.float64, device=device).index_add_(
            0, _ids(n, d, seed, start, 1000 * 1200, device), (gy.double().t() @ x.double()).reshape(-1))
        grad = torch.zeros(d, device=device)
        grad_from_gemm(grad, gy, x, start, n, d, seed, False)
        out["fp32_with_tf32_allowed_rel_err"] = _rel(grad, truth)  # expect ~1e-3: TF32 only when allowed
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    out["offsets_past_2_31"] = _check_large_offsets(device)
    out["ok"] &= out["offsets_past_2_31"]["ok"]
    return out


def _check_large_offsets(device) -> dict:
    """2,049 rows 2**20 apart (4 GiB bf16 each): row * stride passes 2**31 with both factors in int32."""
    from gpart_cli.kernels.triton_gpart import grad_from_gemm

    rows, stride, n, d = 2049, 2**20, 10_000_000, 4099
    views = []
    for width in (64, 96):
        storage = torch.zeros((rows - 1) * stride + width, dtype=torch.bfloat16, device=device)
        views.append(torch.as_strided(storage, (rows, width), (stride, 1)).normal_())
    gy, x = views
    grad = torch.zeros(d, device=device)
    grad_from_gemm(grad, gy, x, 0, n, d, 1, False)
    truth = torch.zeros(d, dtype=torch.float64, device=device).index_add_(
        0, _ids(n, d, 1, 0, 64 * 96, device), (gy.double().t() @ x.double()).reshape(-1))
    err = _rel(grad, truth)
    del views, gy, x
    torch.cuda.empty_cache()
    return {"ok": err < 1e-5, "rel_err": err}


def _tiny_llama(device, dtype, hidden=256, layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _theta_grad(model, tokens):
    import gpart_cli as gpart

    gpart.theta(model).grad = None
    out = model(tokens).logits
    out.float().square().mean().backward()
    return out.detach(), gpart.theta(model).grad.clone()


def check_layer(device) -> dict:
    import gpart_cli as gpart
    from gpart_cli.core.model import compute_path, gpart_layers

    out = {"ok": True}
    tokens = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(1)).to(device)
    for name in ("fp32", "bf16"):
        cfg = gpart.GPartConfig(d=4096, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias=False)
        ref = gpart.apply(_tiny_llama(device, DTYPES[name]), cfg)
        with torch.no_grad():
            gpart.theta(ref).normal_(0, 1e-2)
        fused = copy.deepcopy(ref)
        os.environ["GPART_TRITON"] = "0"
        ref_out, ref_grad = _theta_grad(ref, tokens)
        os.environ["GPART_TRITON"] = "1"
        got_out, got_grad = _theta_grad(fused, tokens)
        os.environ.pop("GPART_TRITON")
        res = {"out_rel_err": _rel(got_out, ref_out), "grad_rel_err": _rel(got_grad, ref_grad),
               "partition_bytes": sum(layer.groups.state_bytes() for _, layer in gpart_layers(fused)),
               "path": compute_path(fused)}
        tol = 1e-5 if name == "fp32" else 2e-2  # bf16: the reference path rounds ∂L/∂W to bf16 first
        res["ok"] = res["out_rel_err"] < tol and res["grad_rel_err"] < tol and res["partition_bytes"] == 0 \
            and res["path"].startswith("Triton kernels")
        out[name] = res
        out["ok"] &= res["ok"]
    return out


def _train_theta(device, steps: int = 5):
    """θ after a few AdamW steps of a bf16 Llama with ΔW dropout (keyed per step, as the trainer keys it)."""
    import gpart_cli as gpart
    from gpart_cli.core.model import set_dropout_key

    torch.manual_seed(0)
    model = gpart.apply(_tiny_llama(device, torch.bfloat16),
                        gpart.GPartConfig(d=4096, target_modules=["q_proj", "v_proj"], dropout=0.1))
    optimizer = torch.optim.AdamW([gpart.theta(model)], lr=1e-2)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        tokens = torch.randint(0, 512, (8, 256), generator=g).to(device)
        set_dropout_key(model, 0, step)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return gpart.theta(model).detach().clone()


def check_determinism(device) -> dict:
    from gpart_cli.train.determinism import configure

    default = [_train_theta(device) for _ in range(2)]
    configure(True)
    try:
        runs = [_train_theta(device) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    return {"ok": bool(torch.equal(runs[0], runs[1])), "deterministic_runs_bit_equal": bool(torch.equal(*runs)),
            "default_runs_bit_equal": bool(torch.equal(*default)),
            "deterministic_vs_default_rel": _rel(runs[0], default[0])}


def check_multi_gpu(device) -> dict:
    """Blocks split over cuda:0 and cuda:1 with accelerate (what device_map="auto" does): same ∂L/∂θ."""
    from accelerate import dispatch_model

    import gpart_cli as gpart
    from gpart_cli.core.model import gpart_layers

    cfg = gpart.GPartConfig(d=4096, target_modules=["q_proj", "v_proj"])
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(3)).to("cuda:0")
    one = gpart.apply(_tiny_llama("cuda:0", torch.float32), cfg)
    with torch.no_grad():
        gpart.theta(one).normal_(0, 1e-2)
    split = copy.deepcopy(one)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1, "gpart_state": 0}
    split = dispatch_model(split, device_map=device_map)
    _, want = _theta_grad(one, tokens)
    _, got = _theta_grad(split, tokens)
    devices = sorted({str(layer.device) for _, layer in gpart_layers(split)})
    err = _rel(got, want)
    return {"ok": err < 1e-5 and devices == ["cuda:0", "cuda:1"], "grad_rel_err": err, "layer_devices": devices,
            "theta_device": str(gpart.theta(split).device)}


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def timings(device) -> dict:
    """ms per fwd+bwd of one 4096x4096 bf16 layer at 8192 tokens: kernel path, reference path, dense floor."""
    import gpart_cli as gpart

    out = {}
    x = torch.randn(8, 1024, 4096, device=device, dtype=torch.bfloat16)
    dense = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False)).to(device, torch.bfloat16)
    model = gpart.apply(copy.deepcopy(dense), gpart.GPartConfig(d=65_536, target_modules=["0"]))
    dense[0].weight.requires_grad_(True)

    def floor():
        dense(x).sum().backward()
        dense[0].weight.grad = None

    def step():
        model(x).sum().backward()

    out["floor_ms"] = _time(floor)
    for mode in ("1", "0"):
        os.environ["GPART_TRITON"] = mode
        out["kernel_ms" if mode == "1" else "reference_ms"] = _time(step)
    os.environ["GPART_TRITON"] = "1"
    torch.use_deterministic_algorithms(True)
    try:
        out["kernel_deterministic_ms"] = _time(step)
    finally:
        torch.use_deterministic_algorithms(False)
        os.environ.pop("GPART_TRITON")
    out["kernel/floor"] = out["kernel_ms"] / out["floor_ms"]
    out["deterministic/kernel"] = out["kernel_deterministic_ms"] / out["kernel_ms"]
    return out


CHECKS = {"selfcheck": check_selfcheck, "kernels": check_kernels, "layer": check_layer,
          "determinism": check_determinism, "multi_gpu": check_multi_gpu}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="checks only, no timings")
    args = p.parse_args()
    from gpart_cli.kernels.dispatch import triton_version

    report = {"torch": torch.__version__, "triton": triton_version(), "checks": {}, "skipped": {}}
    if not torch.cuda.is_available():
        report["device"] = "cpu"
        report["skipped"] = {name: "no CUDA device: the CPU interpreter runs these in tests/kernels/test_kernels.py"
                             for name in [*CHECKS, "timings"]}
        print(json.dumps(report, indent=2))
        print("kernel_check: no CUDA device; every GPU check skipped", file=sys.stderr)
        return 0
    device = torch.device("cuda:0")
    report["device"] = torch.cuda.get_device_name(device)
    report["capability"] = list(torch.cuda.get_device_capability(device))
    for name, check in CHECKS.items():
        if name == "multi_gpu" and torch.cuda.device_count() < 2:
            report["skipped"][name] = "one GPU"
            continue
        try:
            report["checks"][name] = check(device)
        except Exception as e:  # report and carry on: one broken check must not hide the others
            report["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if args.quick:
        report["skipped"]["timings"] = "--quick"
    else:
        report["timings"] = timings(device)
    failed = [name for name, res in report["checks"].items() if not res.get("ok")]
    report["ok"] = not failed
    print(json.dumps(report, indent=2, default=str))
    verdict = "all checks passed" if not failed else "FAILED: " + ", ".join(failed)
    print(f"kernel_check on {report['device']}: {verdict}", file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
