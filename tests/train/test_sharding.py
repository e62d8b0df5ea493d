"""How a step is spread over ranks: every row once, equal forward counts, weights that rebuild the one-process loss."""

import pytest
import torch

from gpart_cli.train.sharding import Piece, loss_units, share, step_plan
from tests.conftest import tiny_llama


@pytest.mark.parametrize("world, accum", [(1, 1), (1, 4), (2, 1), (2, 2), (3, 1), (3, 2), (4, 2), (8, 8), (8, 2),
                                          (6, 4), (16, 8)])
def test_every_share_of_every_micro_batch_is_run_once_and_ranks_run_as_many_forwards(world, accum):
    plans = [step_plan(r, world, accum) for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    groups = [{(pc.micro, pc.part, pc.parts) for pc in p} for p in plans]
    pieces = [x for g in groups for x in g]
    assert len(pieces) == len(set(pieces))
    for micro in range(accum):
        parts = {x[2] for x in pieces if x[0] == micro}
        assert len(parts) == 1 and sorted(x[1] for x in pieces if x[0] == micro) == list(range(parts.pop()))


def test_plans_for_common_layouts():
    # MetaMath's 2 x 8 on 8 GPUs: one whole micro-batch per rank, nothing split.
    assert [step_plan(r, 8, 8) for r in range(8)] == [[Piece(r, 0, 1)] for r in range(8)]
    # 2 micro-batches on 4 ranks: ranks 0-1 split micro-batch 0, ranks 2-3 micro-batch 1.
    assert [step_plan(r, 4, 2) for r in range(4)] == [[Piece(0, 0, 2)], [Piece(0, 1, 2)], [Piece(1, 0, 2)],
                                                      [Piece(1, 1, 2)]]
    # 3 ranks, 2 micro-batches: every micro-batch split three ways.
    assert step_plan(2, 3, 2) == [Piece(0, 2, 3), Piece(1, 2, 3)]


def test_uneven_shares_are_weighted_by_loss_units():
    rows, units = [10, 11, 12, 13, 14], {10: 1, 11: 2, 12: 3, 13: 4, 14: 5}.get
    got = [share(rows, Piece(0, p, 3), 3, units) for p in range(3)]
    assert [r for r, _ in got] == [[10], [11, 12], [13, 14]]
    assert [w for _, w in got] == pytest.approx([3 * 1 / 15, 3 * 5 / 15, 3 * 9 / 15])
    assert share(rows, Piece(0, 0, 1), 4, units) == (rows, 4.0)  # a whole micro-batch: no units needed


def test_a_rank_without_rows_runs_one_with_weight_zero():
    assert [share([7, 8], Piece(0, p, 3), 3, lambda i: 1) for p in range(3)] == [([7], 0.0), ([7], 1.5), ([8], 1.5)]


def test_loss_units_count_label_tokens_after_the_shift():
    assert loss_units({"labels": [5, -100, 3, 4, -100]}, "sft") == 2  # label 0 is never predicted
    assert loss_units({"labels": 1}, "glue") == 1


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_weighted_shares_rebuild_the_causal_lm_micro_batch_loss(parts):
    from gpart_cli.data.sft import SFTCollator

    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in ((9, 4), (5, 2), (12, 7), (7, 3), (10, 1)):
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    collate = SFTCollator(0)
    with torch.no_grad():
        whole = model(**collate(rows)).loss
        total = torch.zeros(())
        for p in range(parts):
            mine, weight = share(list(range(5)), Piece(0, p, parts), parts, lambda i: loss_units(rows[i], "sft"))
            total += model(**collate([rows[i] for i in mine])).loss * weight / parts
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-6)
