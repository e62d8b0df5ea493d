"""The Triton kernels as a GPU runs them: every variant the dispatch launches, compiled for sm_80 and sm_90 without a
GPU (tests/kernels/triton_aot.py), and what the generated code does with the bits the partition depends on.

Everywhere else the kernels run in Triton's interpreter, which neither specialises integer arguments (an argument
equal to 1 becomes a constant: `.to()` on it failed for splitmix64-mod-v1 at d = 1) nor lowers the integer
operations as the compiler does (a signed shift or remainder on a 64-bit hash with its top bit set would change the
group of a weight). The checks read Triton's IR (every pointer offset is int64), the LLVM IR and the PTX.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("triton_aot.py")
SPLITMIX_SHIFTS = ("27", "30", "31")  # z ^= z >> 30; z ^= z >> 27; z ^= z >> 31 on uint64


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("triton-aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(out / "cache"))
    res = subprocess.run([sys.executable, str(SCRIPT), str(out / "aot.json"), str(min(4, os.cpu_count() or 1))],
                         capture_output=True, text=True, timeout=1800, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "aot.json").read_text())
    if "skip" in result:
        pytest.skip(f"compiled Triton cannot be checked here: {result['skip']}")
    return result["variants"]


def _splitmix(v: dict) -> bool:
    return "splitmix64-mod-v1" in v["name"] and "d=1" not in v["name"]  # d = 1: every id is 0, nothing to check


def test_every_variant_the_dispatch_launches_compiles_for_sm80_and_sm90(compiled):
    assert [f"{v['name']} (sm_{v['sm']}): {v['error']}" for v in compiled if "error" in v] == []
    names = sorted({v["name"] for v in compiled})
    assert sorted((v["name"], v["sm"]) for v in compiled) == [(n, sm) for n in names for sm in (80, 90)]
    # per partition: ids 1, build 3 dtypes x W0+ΔW/ΔW x dropout 2, grad 4 dtype/precision x dropout x deterministic,
    # and 4 with arguments equal to 1; then 4 with a splitmix64 seed key half equal to 1.
    assert len(names) == 2 * (1 + 12 + 16 + 4) + 4


def test_every_pointer_offset_is_int64(compiled):
    narrow = []
    for v in compiled:
        offsets = [m.rsplit(", ", 1)[1] for m in re.findall(r"tt\.addptr [^:]*: (.*?) loc\(", v["ttir"])]
        narrow += [(v["name"], "ttir", t) for t in offsets if not (t == "i64" or t.endswith("xi64>"))]
        indices = re.findall(r"getelementptr (?:inbounds )?[^,]+, ptr addrspace\(1\) %[\w.]+, (i\d+)", v["llir"])
        narrow += [(v["name"], "llir", t) for t in indices if t != "i64"]
    assert narrow == []


def _llvm_shifts(llir: str) -> set[tuple[str, str]]:
    """(lshr | ashr, amount) of every 64-bit right shift by a constant, scalar or vector."""
    pattern = r"\b(lshr|ashr)(?: exact)? (?:<\d+ x i64>|i64) %[\w.]+, (?:splat \(i64 (\d+)\)|(\d+))"
    return {(op, a or b) for op, a, b in re.findall(pattern, llir)}


def test_splitmix64_hashes_with_logical_shifts_and_an_unsigned_remainder(compiled):
    checked = [v for v in compiled if _splitmix(v)]
    assert len(checked) == 2 * (1 + 12 + 16 + 4)
    for v in checked:
        shifts = _llvm_shifts(v["llir"])
        assert {("lshr", s) for s in SPLITMIX_SHIFTS} <= shifts, v["name"]
        assert not {("ashr", s) for s in SPLITMIX_SHIFTS} & shifts, v["name"]
        assert re.search(r"\burem (?:<\d+ x i64>|i64) ", v["llir"]) and not re.search(r"\bsrem [^\n]*i64", v["llir"])
        ptx = set(re.findall(r"\bshr\.([us]64)\s+%\w+,\s*%\w+,\s*(\d+);", v["ptx"]))
        assert {("u64", s) for s in SPLITMIX_SHIFTS} <= ptx and not {("s64", s) for s in SPLITMIX_SHIFTS} & ptx
        assert "rem.u64" in v["ptx"] and "rem.s64" not in v["ptx"], v["name"]


def test_feistel_groups_divide_in_64_bits(compiled):
    # g = pi(i) * d // N: the product reaches 2**62, so a 32-bit division anywhere would be a bug.
    for v in (v for v in compiled if "feistel-v1" in v["name"]):
        assert re.search(r"\b[su]div (?:<\d+ x i64>|i64) ", v["llir"]), v["name"]
        assert re.search(r"\bdiv\.[su]64\b", v["ptx"]), v["name"]


def test_the_deterministic_reduction_adds_int64_and_the_fast_one_fp32(compiled):
    grads = [v for v in compiled if v["name"].startswith("grad ")]
    for v in grads:
        adds = set(re.findall(r"\b(?:atom|red)\.global\.[\w.]*?add\.(\w+)", v["ptx"]))
        deterministic = "deterministic True" in v["name"] or "T=M=N=1" in v["name"]
        assert adds == ({"u64"} if deterministic else {"f32"}), (v["name"], adds)
