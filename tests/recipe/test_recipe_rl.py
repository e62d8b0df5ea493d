"""The recipe's rl section (docs/rl.md): defaults, ranges and names, validated like every other field."""

from __future__ import annotations

import pytest

from gpart_cli.errors import GpartError
from gpart_cli.recipe.schema import from_dict

BASE = {"model": {"name_or_path": "m"}}


def test_defaults_keep_supervised_training():
    rl = from_dict(BASE).rl
    assert (rl.objective, rl.group_size, rl.kl_weight, rl.format_reward, rl.use_vllm) == ("none", 8, 0.0, 0.0, False)


def test_fields_parse():
    rl = from_dict({**BASE, "rl": {"objective": "grpo", "group_size": 4, "temperature": "0.7", "kl_weight": 0,
                                   "reward": "flexible", "max_completion_length": 64}}).rl
    assert (rl.objective, rl.group_size, rl.temperature, rl.kl_weight, rl.reward) == ("grpo", 4, 0.7, 0.0,
                                                                                       "flexible")


@pytest.mark.parametrize("field,value,message", [
    ("objective", "gpro", "rl.objective = 'gpro' is not one of none, grpo (did you mean 'grpo'?)"),
    ("group_size", 1, "rl.group_size = 1 must be >= 2"),
    ("temperature", 0, "rl.temperature = 0.0 must be > 0.0"),
    ("kl_weight", -0.1, "rl.kl_weight = -0.1 must be >= 0.0"),
    ("max_completion_length", 0, "rl.max_completion_length = 0 must be >= 1"),
    ("vllm_gpu_memory_utilization", 1.5, "rl.vllm_gpu_memory_utilization = 1.5 must be > 0.0 and <= 1.0"),
    ("group_sise", 4, "unknown recipe key 'rl.group_sise'; did you mean rl.group_size?"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(GpartError) as e:
        from_dict({**BASE, "rl": {field: value}})
    assert message in str(e.value)
