"""`gpart inspect` (docs/design.md §4-5): everything an adapter file says, plus theta statistics."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from ..core.artifact import Artifact
from ..core.config import STORED
from ..kernels.dispatch import describe

LORA_RANK = 8  # the comparison point users know: LoRA r=8 on the same target modules


def lora_equivalent_params(targets: list[dict], rank: int = LORA_RANK) -> int:
    """Trainable parameters of LoRA with rank `rank` on the same 2-D target weights: r·(in + out) each."""
    return sum(rank * (t["shape"][0] + t["shape"][1]) for t in targets if len(t["shape"]) == 2)


def summarize(art: Artifact) -> dict:
    """A JSON-ready description of the adapter."""
    theta = art.theta.double()
    meta = art.meta
    lora = lora_equivalent_params(meta["targets"])
    head_params = sum(t.numel() for t in art.head.values())
    return {
        "file": str(art.path), "size_bytes": art.size_bytes, "format": meta["format"],
        **{k: meta[k] for k in STORED}, "compute": meta["compute"], "compute_path": describe(meta["compute"]),
        "n_params": meta["n_params"], "compression": meta["n_params"] / meta["d"],
        "targets": meta["targets"], "base_model": meta["base_model"], "task": meta["task"],
        "head": {name: list(t.shape) for name, t in art.head.items()}, "head_params": head_params,
        "theta": {"norm": float(theta.norm()), "min": float(theta.min()), "max": float(theta.max()),
                  "mean_abs": float(theta.abs().mean()),
                  "fraction_nonzero": float((theta != 0).double().mean())},
        "storage": {"gpart_bytes": art.size_bytes, f"lora_r{LORA_RANK}_params": lora + head_params,
                    f"lora_r{LORA_RANK}_bytes_fp32": 4 * (lora + head_params),
                    "ratio_vs_lora": (4 * (lora + head_params)) / max(art.size_bytes, 1)},
        "versions": meta["versions"], "recipe": meta["recipe"], "imported_from": meta.get("imported_from"),
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _targets_line(targets: list[dict]) -> str:
    leaves: dict[str, int] = {}
    for t in targets:
        leaf = t["name"].rsplit(".", 1)[-1]
        leaves[leaf] = leaves.get(leaf, 0) + 1
    kinds = ", ".join(f"{k} ×{v}" for k, v in leaves.items())
    return f"{len(targets)} modules ({kinds}); first {targets[0]['name']} {targets[0]['shape']}"


def render(summary: dict, console: Console) -> None:
    """Print the summary as one Rich table."""
    s = summary
    table = Table(title=f"GPart adapter · {s['file']}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    th, st, base, task = s["theta"], s["storage"], s["base_model"], s["task"]
    rows = [
        ("format", f"{s['format']} · partition {s['partition']} · isometric {s['isometric']}"),
        ("d · seed", f"{s['d']:,} · {s['seed']}"),
        ("training", f"ΔW dropout {s['dropout']:g} · θ init "
                     + (f"uniform ±{s['init_bound']:g} (seed {s['init_seed']})" if s["init_bound"] else "zeros")),
        ("compute path", s["compute_path"]),
        ("adapted params N", f"{s['n_params']:,} ({s['compression']:,.1f} weights per theta entry)"),
        ("targets", _targets_line(s["targets"])),
        ("base model", f"{base.get('name_or_path') or '?'} (revision {base.get('revision') or 'default'}, "
                       f"{base.get('dtype') or '?'})"),
        ("fingerprint", str(base.get("fingerprint"))),
        ("task", ", ".join(f"{k}={v}" for k, v in task.items() if v not in (None, [], ""))) or "-",
        ("head", ", ".join(f"{k} {v}" for k, v in s["head"].items()) or "none"),
        ("theta", f"‖θ‖={th['norm']:.4g} min={th['min']:.4g} max={th['max']:.4g} "
                  f"mean|θ|={th['mean_abs']:.4g} non-zero={th['fraction_nonzero']:.1%}"),
        ("storage", f"{_size(st['gpart_bytes'])} on disk vs LoRA r={LORA_RANK} "
                    f"{_size(st[f'lora_r{LORA_RANK}_bytes_fp32'])} (fp32): {st['ratio_vs_lora']:,.1f}× smaller"),
        ("versions", ", ".join(f"{k} {v}" for k, v in s["versions"].items())),
        ("recipe", ", ".join(sorted(s["recipe"])) if s["recipe"] else "-"),
    ]
    source = s.get("imported_from")
    if source:
        raw = source.get("adapter_config") or {}
        rows.append(("imported from", f"{source.get('format')} (assignment_backend "
                                      f"{raw.get('assignment_backend', 'stateless')}, proj_seed {raw.get('proj_seed')}, "
                                      f"bias {raw.get('bias', 'none')})"))
    for key, value in rows:
        table.add_row(key, value if not isinstance(value, float) or math.isfinite(value) else "nan")
    console.print(table)
