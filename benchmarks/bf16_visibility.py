"""How many θ updates a bf16 forward cannot see: W_eff = W0 + ΔW rounded to bf16 hides changes of ΔW smaller than
half a bf16 step of W0 (|W0| ~ 0.03: steps of 2^-13 ~ 1.2e-4).

    python benchmarks/bf16_visibility.py                       # d 512 and 16, lr 2e-4 (the MetaMath recipes) and 1e-2
    python benchmarks/bf16_visibility.py --steps 100 --d 512 --lr 2e-4

A tiny Llama (hidden 64, 2 layers, weights ~ N(0, 0.03²), stored in bf16) trains GPart on q/k/v/o with AdamW for
`--steps` steps on fixed random tokens. After each step, for every group j whose θ_j changed, it checks whether any of
the group's weights changed in the bf16 W_eff, under two formulations of the same θ:
- gpart:   W_eff = bf16(W0 + ΔW), the sum in fp32, rounded once (what every gpart path computes and merges);
- authors: W_eff = bf16(W0 + bf16(ΔW)), ΔW = θ·scale cast to the base dtype, then added (SamsungLabs/GPart).
A group whose update changed no weight is "invisible" at that step: the forward is the same as before it (its θ
keeps the change, so later steps may still show it). Prints one JSON object; CPU, seconds.
"""

from __future__ import annotations

import argparse
import json

import torch


def tiny_bf16_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, initializer_range=0.03)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def effective_weights(model) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(group ids, gpart W_eff, authors' W_eff) of every adapted layer, flat."""
    from gpart_cli.core.model import gpart_layers

    out = []
    for _, layer in gpart_layers(model):
        w0 = layer.base_layer.weight.detach().reshape(-1)
        ids = layer.groups.ids(w0.device)[: layer.groups.n_weight].long()
        delta = layer.state.scaled_theta(w0.device).detach()[ids]
        out.append((ids, (w0.float() + delta).to(w0.dtype), w0 + delta.to(w0.dtype)))
    return out


def measure(d: int, lr: float, steps: int, seed: int = 0) -> dict:
    import gpart_cli as gpart

    model = gpart.apply(tiny_bf16_llama(seed), gpart.GPartConfig(d=d, target_modules=("q_proj", "k_proj", "v_proj",
                                                                                        "o_proj")))
    theta = gpart.theta(model)
    optimizer = torch.optim.AdamW([theta], lr=lr, weight_decay=0.0)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(seed))
    before = effective_weights(model)
    n = gpart.model.state_of(model).n_params
    counts = {"updates": 0, "gpart_invisible": 0, "authors_invisible": 0, "weights_changed_gpart": 0,
              "weights_changed_authors": 0}
    model.train()
    for _ in range(steps):
        old = theta.detach().clone()
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        changed = theta.detach() != old
        after = effective_weights(model)
        seen = {"gpart": torch.zeros(d, dtype=torch.bool), "authors": torch.zeros(d, dtype=torch.bool)}
        for (ids, g0, a0), (_, g1, a1) in zip(before, after):
            for name, moved in (("gpart", g0 != g1), ("authors", a0 != a1)):
                seen[name][ids[moved]] = True
                counts[f"weights_changed_{name}"] += int(moved.sum())
        counts["updates"] += int(changed.sum())
        for name in ("gpart", "authors"):
            counts[f"{name}_invisible"] += int((changed & ~seen[name]).sum())
        before = after
    return {"d": d, "lr": lr, "steps": steps, "N": n, "weights_per_group": round(n / d, 1),
            "scale": round(float(gpart.model.state_of(model).inv_sqrt_sizes.mean()), 4), **counts,
            "gpart_invisible_fraction": round(counts["gpart_invisible"] / max(counts["updates"], 1), 4),
            "authors_invisible_fraction": round(counts["authors_invisible"] / max(counts["updates"], 1), 4),
            "final_loss": None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--d", type=int, nargs="*", default=[512, 16])
    parser.add_argument("--lr", type=float, nargs="*", default=[2e-4, 1e-2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [measure(d, lr, args.steps) for d in args.d for lr in args.lr]
    for r in runs:
        r.pop("final_loss")
    print(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
