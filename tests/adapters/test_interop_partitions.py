"""The authors' partitions (splitmix64-mod-v1, torch-randint-v1) against test vectors produced by THEIR code.

The vectors below were printed by running the authors' PEFT fork (SamsungLabs/GPart at 320f0c1, `peft/tuners/gpart`):

    PYTHONPATH=$GPART_AUTHORS_PEFT python tests/adapters/authors_side.py vectors

which builds a toy model of Linear layers of the given shapes, applies their `get_peft_model(GPartConfig(d,
proj_seed, bias, assignment_backend))`, and prints each layer's `_get_group_ids` and their `gpart_global_scales`
(and, for FAR, their `generate_implicit_group_ids` far from index 0). They cover seeds >= 2**63, d not a power of
two, d > N (empty groups, clamped to scale 1), bias modes none / all / gpart_only, and both backends.
`test_vectors_still_match_their_code` re-runs that command when GPART_AUTHORS_PEFT is set (see docs/interop.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpart_cli.partition import RANDINT, SPLITMIX, Partition
from gpart_cli.partition.authors import _splitmix_torch, splitmix64_mod_ids, splitmix64_mod_one

CASES = [{'backend': 'stateless',
  'seed': 0,
  'd': 7,
  'shapes': [[3, 5], [2, 4]],
  'biases': [True, False],
  'bias': 'gpart_only',
  'ids': [[2, 2, 4, 2, 6, 3, 3, 2, 4, 2, 1, 1, 1, 2, 5, 0, 2, 6], [1, 1, 5, 2, 2, 0, 3, 0]],
  'scales_hex': ['0x1.279a740000000p-1', '0x1.c9f25c0000000p-2', '0x1.5555560000000p-2', '0x1.279a740000000p-1',
                 '0x1.6a09e60000000p-1', '0x1.6a09e60000000p-1', '0x1.6a09e60000000p-1']},
 {'backend': 'stateless',
  'seed': 9223372036854788153,
  'd': 10,
  'shapes': [[4, 6], [5, 3]],
  'biases': [True, True],
  'bias': 'none',
  'ids': [[9, 9, 2, 0, 5, 8, 9, 3, 3, 6, 0, 1, 4, 3, 0, 2, 9, 9, 5, 3, 6, 3, 8, 7],
          [1, 3, 1, 4, 4, 1, 2, 5, 7, 3, 1, 1, 2, 3, 8]],
  'scales_hex': ['0x1.279a740000000p-1', '0x1.a20bd60000000p-2', '0x1.0000000000000p-1', '0x1.6a09e60000000p-2',
                 '0x1.279a740000000p-1', '0x1.279a740000000p-1', '0x1.6a09e60000000p-1', '0x1.6a09e60000000p-1',
                 '0x1.279a740000000p-1', '0x1.c9f25c0000000p-2']},
 {'backend': 'stateless',
  'seed': 18446744073709551613,
  'd': 24,
  'shapes': [[3, 4], [2, 3]],
  'biases': [True, True],
  'bias': 'all',
  'ids': [[13, 17, 8, 7, 17, 22, 21, 10, 2, 8, 15, 22, 4, 10, 21], [3, 7, 14, 5, 23, 3, 10, 12]],
  'scales_hex': ['0x1.0000000000000p+0', '0x1.0000000000000p+0', '0x1.0000000000000p+0', '0x1.6a09e60000000p-1',
                 '0x1.0000000000000p+0', '0x1.0000000000000p+0', '0x1.0000000000000p+0', '0x1.6a09e60000000p-1',
                 '0x1.6a09e60000000p-1', '0x1.0000000000000p+0', '0x1.279a740000000p-1', '0x1.0000000000000p+0',
                 '0x1.0000000000000p+0', '0x1.0000000000000p+0', '0x1.0000000000000p+0', '0x1.0000000000000p+0',
                 '0x1.0000000000000p+0', '0x1.6a09e60000000p-1', '0x1.0000000000000p+0', '0x1.0000000000000p+0',
                 '0x1.0000000000000p+0', '0x1.6a09e60000000p-1', '0x1.6a09e60000000p-1', '0x1.0000000000000p+0']},
 {'backend': 'materialized',
  'seed': 42,
  'd': 13,
  'shapes': [[4, 8], [5, 3]],
  'biases': [True, False],
  'bias': 'all',
  'ids': [[5, 8, 6, 4, 4, 11, 9, 7, 5, 7, 4, 2, 5, 11, 9, 9, 8, 1, 2, 6, 12, 1, 10, 1, 1, 5, 8, 12, 5, 12, 1, 12,
           5, 1, 4, 11],
          [0, 7, 10, 8, 1, 5, 2, 6, 1, 1, 8, 2, 0, 5, 4]],
  'scales_hex': ['0x1.6a09e60000000p-1', '0x1.5555560000000p-2', '0x1.0000000000000p-1', '0x1.0000000000000p+0',
                 '0x1.c9f25c0000000p-2', '0x1.6a09e60000000p-2', '0x1.279a740000000p-1', '0x1.279a740000000p-1',
                 '0x1.c9f25c0000000p-2', '0x1.279a740000000p-1', '0x1.6a09e60000000p-1', '0x1.279a740000000p-1',
                 '0x1.0000000000000p-1']},
 {'backend': 'materialized',
  'seed': 9223372036854775815,
  'd': 6,
  'shapes': [[2, 5], [3, 3]],
  'biases': [False, True],
  'bias': 'gpart_only',
  'ids': [[3, 4, 1, 2, 1, 3, 5, 5, 4, 5], [4, 1, 2, 3, 2, 4, 0, 4, 3, 0, 0, 4]],
  'scales_hex': ['0x1.279a740000000p-1', '0x1.279a740000000p-1', '0x1.279a740000000p-1', '0x1.0000000000000p-1',
                 '0x1.a20bd60000000p-2', '0x1.279a740000000p-1']}]
FAR = [{'start': 1000000000000,
  'numel': 6,
  'd': 1000003,
  'seed': 9223372036854775813,
  'ids': [645017, 618353, 425690, 303647, 173522, 33271]},
 {'start': 1099511627793, 'numel': 5, 'd': 23040, 'seed': 7, 'ids': [3373, 8561, 21756, 12801, 18596]},
 {'start': 123456789, 'numel': 4, 'd': 3, 'seed': 18446744073709551615, 'ids': [2, 2, 0, 0]}]
BACKEND = {"stateless": SPLITMIX, "materialized": RANDINT}


def _layer_sizes(case: dict) -> list[int]:
    adapt_bias = case["bias"] != "none"
    return [o * i + (o if has_bias and adapt_bias else 0) for (o, i), has_bias in zip(case["shapes"], case["biases"])]


def _partition(case: dict) -> Partition:
    sizes = _layer_sizes(case)
    return Partition(BACKEND[case["backend"]], sum(sizes), case["d"], case["seed"], sizes)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['backend']}-seed{c['seed']}-d{c['d']}")
def test_ids_and_scales_match_their_code(case):
    part, offset = _partition(case), 0
    for size, expected in zip(_layer_sizes(case), case["ids"]):
        assert part.ids(offset, size).tolist() == expected
        offset += size
    assert [float(s).hex() for s in part.scales(True).tolist()] == case["scales_hex"]
    counts = torch.bincount(torch.tensor(sum(case["ids"], [])), minlength=case["d"])
    assert torch.equal(part.counts(), counts)
    assert part.scales(False).tolist() == [1.0] * case["d"]


def test_empty_groups_are_clamped_like_theirs():
    case = CASES[2]  # d = 24 > N = 23: some groups get no weight, and their scale is 1/sqrt(1)
    part = _partition(case)
    empty = (part.counts() == 0).nonzero().flatten().tolist()
    assert empty == [0, 1, 6, 9, 11, 16, 18, 19, 20]
    assert part.scales(True)[empty].tolist() == [1.0] * len(empty)


@pytest.mark.parametrize("far", FAR, ids=lambda f: f"start{f['start']}-d{f['d']}")
def test_random_access_far_from_zero(far):
    args = far["start"], far["numel"], far["d"], far["seed"]
    assert splitmix64_mod_ids(*args).tolist() == far["ids"]
    assert _splitmix_torch(*args, device="cpu").tolist() == far["ids"]  # the torch-ops path of non-CPU devices
    assert [splitmix64_mod_one(far["start"] + k, far["d"], far["seed"]) for k in range(far["numel"])] == far["ids"]


def test_torch_and_numpy_paths_agree_on_a_long_range():
    for d in (1, 3, 23_040, 2**31 - 1, 2**62 + 3):
        for seed in (0, 2**63 + 9, 2**64 - 1):
            assert torch.equal(_splitmix_torch(5_000, 20_000, d, seed, "cpu"), splitmix64_mod_ids(5_000, 20_000, d, seed))


def test_negative_seed_is_taken_mod_2_64():
    assert splitmix64_mod_ids(0, 50, 97, -3).tolist() == splitmix64_mod_ids(0, 50, 97, 2**64 - 3).tolist()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GPART_AUTHORS_PEFT"),
                    reason="set GPART_AUTHORS_PEFT to a clone of SamsungLabs/GPart (see docs/interop.md)")
def test_vectors_still_match_their_code():
    env = {**os.environ, "PYTHONPATH": os.environ["GPART_AUTHORS_PEFT"]}
    script = Path(__file__).with_name("authors_side.py")
    out = subprocess.run([sys.executable, str(script), "vectors"], env=env, capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout)
    keys = ("backend", "seed", "d", "shapes", "biases", "bias", "ids", "scales_hex")
    assert [{k: c[k] for k in keys} for c in theirs["cases"]] == CASES
    assert theirs["far"] == FAR
