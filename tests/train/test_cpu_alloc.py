"""The CPU allocator thresholds `gpart train` sets: freed blocks are reused, not page-faulted afresh."""

import os
import subprocess
import sys
import textwrap

import pytest

from gpart_cli.train import cpu_alloc

# Allocate and fill a 64 MB tensor 8 times; print the minor page faults of the last two fills (glibc's heap takes a
# few rounds to settle: the first ones may fault).
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from gpart_cli.train.cpu_alloc import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "on" else False
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 << 20).fill_(1.0)
        del t
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, sum(faults[-2:]))
""")


def _probe(mode: str, **env) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GPART_CPU_ALLOC"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = _probe("on")
    assert applied == "True"
    assert faults < 100  # the 64 MB block is reused: nothing new to fault in
    _, default_faults = _probe("off")
    assert default_faults > 2 * 16000  # glibc unmaps a 64 MB block on free: 16,384 4 KB pages faulted per fill


@pytest.mark.slow
def test_user_settings_and_opt_out_are_respected(monkeypatch):
    for env in ({"GPART_CPU_ALLOC": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}):
        applied, _ = _probe("on", **env)
        assert applied == "False"
    monkeypatch.setattr(cpu_alloc, "_applied", None)
    monkeypatch.setenv("GPART_CPU_ALLOC", "0")
    assert cpu_alloc.keep_freed_memory() is False
    assert cpu_alloc._applied is False  # decided once per process
