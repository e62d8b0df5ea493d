"""Compile every Triton kernel variant gpart dispatches for sm_80 and sm_90, without a GPU, and report what the
generated code does with the bits (run by tests/kernels/test_triton_compiled.py in a subprocess).

    python tests/kernels/triton_aot.py OUT.json [WORKERS]

TRITON_INTERPRET must be unset: the interpreter replaces @triton.jit functions by Python ones that cannot be
compiled. Each variant is made by calling the real launcher (`triton_gpart.build_weight`, `grad_from_gemm`,
`group_ids_triton`) on small CPU tensors with the kernel replaced by a recorder, so its arguments, and what Triton
specialises on them (an integer equal to 1 becomes a constant), are exactly those of a launch. The recorded launch
is then bound and compiled by Triton's own launch-time code for a `GPUTarget("cuda", SM, 32)`; ptxas from the
triton wheel assembles the PTX, so no CUDA driver or GPU is needed.

OUT.json: {"triton": version, "variants": [{"name", "sm", "error" | "ttir", "llir", "ptx"}]}, or {"skip": why}.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys

import torch

SMS = (80, 90)


def _seed_with_base(base: int) -> int:
    """A seed whose splitmix64-mod-v1 kernel key (seed + GAMMA mod 2**64) is `base`: its 32-bit halves are k0, k1."""
    from gpart_cli.partition.authors import GAMMA

    return (base - GAMMA) % 2**64


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running."""

    def __init__(self, fn, launches: list) -> None:
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _launches() -> list[tuple[str, object, tuple, dict]]:
    """(name, kernel, args, kwargs) of every variant the dispatch can launch."""
    from gpart_cli.kernels import triton_gpart as tg

    recorded: list = []
    for name in ("_ids_kernel", "_build_kernel", "_grad_kernel"):
        setattr(tg, name, _Recorder(getattr(tg, name), recorded))
    out: list = []

    def add(name: str, launch) -> None:
        launch()
        out.append((name, *recorded.pop()))

    algorithms = ("feistel-v1", "splitmix64-mod-v1")
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    drop = (1_234_567_891, 0xABCDEF0123)  # (threshold, key) as the trainer passes them
    for algo in algorithms:
        add(f"ids {algo}", lambda: tg.group_ids_triton(5000, 7, 3, 0, 40, "cpu", algorithm=algo))
        for dtype in dtypes:
            for base in (True, False):
                for dropout in (None, drop):
                    w = torch.zeros(64, dtype=dtype) if base else None
                    add(f"build {algo} {_name(dtype)} {'W0+ΔW' if base else 'ΔW'} dropout {dropout is not None}",
                        lambda: tg.build_weight(w, torch.zeros(7), 0, 5000, 7, 3, shape=(64,), dtype=dtype,
                                                dropout=dropout, algorithm=algo))
        # tl.dot precision on sm80+: fp32 "ieee", or "tf32" when torch allows TF32 matmuls; bf16/fp16 upcast, "tf32".
        for dtype, precision in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "tf32"),
                                 (torch.float16, "tf32")):
            for dropout in (None, drop):
                for deterministic in (False, True):
                    add(f"grad {algo} {_name(dtype)} {precision} dropout {dropout is not None} "
                        f"deterministic {deterministic}",
                        _grad(tg, dtype, precision, 40, 48, 32, 0, 5000, 7, 3, algo, dropout, deterministic))
    # Integer arguments equal to 1, which Triton compiles as constants: d = 1, one-weight layers and one-token
    # batches, start = 1, strides of 1 (Conv1D's transposed layout), and keys whose 32-bit halves are 1.
    for algo, n in (("feistel-v1", 3), ("splitmix64-mod-v1", 2)):
        add(f"ids {algo} start=1 count=1 d=1", lambda: tg.group_ids_triton(n, 1, 3, 1, 1, "cpu", algorithm=algo))
        add(f"build {algo} d=1 start=1 count=1 key halves 1",
            lambda: tg.build_weight(torch.zeros(1), torch.zeros(1), 1, n, 1, 3, dropout=(1, (1 << 32) | 1),
                                    algorithm=algo))
        for transposed in (False, True):
            add(f"grad {algo} T=M=N=1 d=1 start=1 transposed {transposed}",
                _grad(tg, torch.float32, "ieee", 1, 1, 1, 1, n, 1, 3, algo, (1, (1 << 32) | 1), True, transposed))
    for half in ("high", "low"):
        seed = _seed_with_base((1 << 32) | 5 if half == "high" else (7 << 32) | 1)
        add(f"build splitmix64-mod-v1 seed key {half} half 1",
            lambda: tg.build_weight(torch.zeros(64), torch.zeros(7), 0, 5000, 7, seed,
                                    algorithm="splitmix64-mod-v1"))
        add(f"grad splitmix64-mod-v1 seed key {half} half 1",
            _grad(tg, torch.bfloat16, "tf32", 40, 48, 32, 0, 5000, 7, seed, "splitmix64-mod-v1", None, False))
    return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _grad(tg, dtype, precision, T, M, N, start, n, d, seed, algo, dropout, deterministic, transposed=False):
    def launch():
        real = tg.dot_precision
        tg.dot_precision = lambda dt, device: (precision, dt != torch.float32)  # what an sm80+ GPU gets
        try:
            tg.grad_from_gemm(torch.zeros(d), torch.zeros(T, M, dtype=dtype), torch.zeros(T, N, dtype=dtype), start,
                              n, d, seed, transposed, dropout=dropout, deterministic=deterministic,
                              max_members=M * N, algorithm=algo)
        finally:
            tg.dot_precision = real
    return launch


JOBS: list = []  # (name, kernel, args, kwargs, sm), filled before the workers fork (kernels do not pickle)


def _compile(i: int) -> dict:
    """Bind recorded launch `i` as Triton does at launch time, compile it for its SM; its code, or its error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    name, fn, args, kwargs, sm = JOBS[i]
    target = GPUTarget("cuda", sm, 32)
    backend = make_backend(target)
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # reported per variant, by its root cause (Triton wraps it in one error per call level)
        while e.__cause__ is not None or e.__context__ is not None:
            e = e.__cause__ or e.__context__
        return {"name": name, "sm": sm, "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}
    return {"name": name, "sm": sm, "ttir": kernel.asm["ttir"], "llir": kernel.asm["llir"], "ptx": kernel.asm["ptx"]}


def cannot_compile_here() -> str | None:
    """Why this machine's Triton cannot compile for NVIDIA GPUs (the test then skips, saying so), or None."""
    try:
        import triton
        from triton.backends import backends
    except ImportError as e:
        return f"triton does not import ({e})"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} on this platform has no NVIDIA backend"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        for sm in SMS:
            get_ptxas(sm).path  # noqa: B018  (finding the binary is the check)
    except Exception as e:  # no ptxas in the wheel and none on TRITON_PTXAS_PATH
        return f"triton {triton.__version__} finds no ptxas to assemble sm_80/sm_90 code ({e})"
    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"triton {triton.__version__} binds launches differently from the 3.x line this script drives ({e})"
    if not hasattr(JITFunction, "_pack_args"):
        return (f"triton {triton.__version__} binds launches differently from the 3.x line this script drives "
                f"(no JITFunction._pack_args)")
    return None


def main(out: str, workers: int) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    why = cannot_compile_here()
    if why is not None:
        result = {"skip": why}
    else:
        import triton

        JOBS.extend((name, fn, args, kwargs, sm) for name, fn, args, kwargs in _launches() for sm in SMS)
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            variants = pool.map(_compile, range(len(JOBS)), chunksize=1)
        result = {"triton": triton.__version__, "variants": variants}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
