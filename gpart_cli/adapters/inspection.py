"""`gpart inspect` (docs/design.md §4-5): everything an adapter file says, plus theta statistics."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from ..core.artifact import Artifact
from ..core.config import STORED
from ..errors import GpartError
from ..kernels.dispatch import describe
from . import authors_format
from .reference import AdapterRef, resolved_artifact

LORA_RANK = 8  # the comparison point users know: LoRA r=8 on the same target modules


def lora_equivalent_params(targets: list[dict], rank: int = LORA_RANK) -> int:
    """Trainable parameters of LoRA with rank `rank` on the same 2-D target weights: r·(in + out) each."""
    return sum(rank * (t["shape"][0] + t["shape"][1]) for t in targets if len(t["shape"]) == 2)


def _theta_stats(theta) -> dict:
    theta = theta.double()
    return {"norm": float(theta.norm()), "min": float(theta.min()), "max": float(theta.max()),
            "mean_abs": float(theta.abs().mean()), "fraction_nonzero": float((theta != 0).double().mean())}


def summarize(art: Artifact) -> dict:
    """A JSON-ready description of the adapter."""
    meta = art.meta
    lora = lora_equivalent_params(meta["targets"])
    head_params = sum(t.numel() for t in art.head.values())
    return {
        "file": str(art.path), "size_bytes": art.size_bytes, "format": meta["format"],
        **{k: meta[k] for k in STORED}, "compute": meta["compute"], "compute_path": describe(meta["compute"]),
        "n_params": meta["n_params"], "compression": meta["n_params"] / meta["d"],
        "targets": meta["targets"], "base_model": meta["base_model"], "task": meta["task"],
        "head": {name: list(t.shape) for name, t in art.head.items()}, "head_params": head_params,
        "theta": _theta_stats(art.theta),
        "storage": {"gpart_bytes": art.size_bytes, f"lora_r{LORA_RANK}_params": lora + head_params,
                    f"lora_r{LORA_RANK}_bytes_fp32": 4 * (lora + head_params),
                    "ratio_vs_lora": (4 * (lora + head_params)) / max(art.size_bytes, 1)},
        "versions": meta["versions"], "recipe": meta["recipe"], "imported_from": meta.get("imported_from"),
    }


# What only the base model tells about an authors' adapter (their files record module-name patterns, not the spec).
NEEDS_BASE = ("the module spec (target names and shapes), N and weights per θ entry, the base fingerprint and the "
              f"size vs LoRA r={LORA_RANK}")


def summarize_unresolved(adapter: authors_format.AuthorsAdapter, why: str) -> dict:
    """What an authors' adapter says without its base: a JSON-ready description with `summarize`'s keys where they
    can be known, and `unresolved` (why the base could not be opened, and what --model adds)."""
    raw = adapter.raw
    return {
        "file": str(adapter.directory), "size_bytes": adapter.weights_path.stat().st_size,
        "format": authors_format.FORMAT, "d": adapter.d, "seed": adapter.seed, "partition": adapter.partition,
        "isometric": adapter.isometric, "dropout": adapter.dropout, "init_bound": adapter.init_bound,
        "target_modules": adapter.target_modules if isinstance(adapter.target_modules, str)
        else list(adapter.target_modules), "bias": adapter.bias,
        "base_model": {"name_or_path": raw.get("base_model_name_or_path") or None, "revision": raw.get("revision")},
        "task": {"type": adapter.task_type, "num_labels": adapter.num_labels,
                 "head_modules": list(adapter.head_modules)},
        "head": {name: list(t.shape) for name, t in adapter.head.items()},
        "head_params": sum(t.numel() for t in adapter.head.values()), "theta": _theta_stats(adapter.theta),
        "imported_from": {"format": authors_format.FORMAT, "adapter_config": raw,
                          "assignment_backend": authors_format.backend_line(raw)},
        "unresolved": {"why": why, "with_model": NEEDS_BASE},
    }


def summarize_adapter(ref: AdapterRef, model: str | None = None, trust_remote_code: bool = False) -> dict:
    """What `gpart inspect` shows of an opened adapter: `summarize` of its artifact; for an authors' adapter whose
    recorded base cannot be used (and no --model), what its own files say (`summarize_unresolved`)."""
    try:
        return summarize(resolved_artifact(ref, model, trust_remote_code))
    except GpartError as e:
        if ref.kind != "authors" or model is not None:
            raise
        return summarize_unresolved(ref.authors, str(e))


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
    rows = _unresolved_rows(s) if "unresolved" in s else _rows(s)
    if s.get("imported_from"):
        rows.append(("imported from", _imported_line(s["imported_from"])))
    for key, value in rows:
        table.add_row(key, value if not isinstance(value, float) or math.isfinite(value) else "nan")
    console.print(table)


def _method_rows(s: dict) -> list[tuple[str, str]]:
    th = s["theta"]
    return [
        ("format", f"{s['format']} · partition {s['partition']} · isometric {s['isometric']}"),
        ("d · seed", f"{s['d']:,} · {s['seed']}"),
        ("training", f"ΔW dropout {s['dropout']:g} · θ init "
                     + (f"uniform ±{s['init_bound']:g} (seed {s.get('init_seed')})" if s["init_bound"] else "zeros")),
        ("theta", f"‖θ‖={th['norm']:.4g} min={th['min']:.4g} max={th['max']:.4g} "
                  f"mean|θ|={th['mean_abs']:.4g} non-zero={th['fraction_nonzero']:.1%}"),
    ]


def _task_rows(s: dict) -> list[tuple[str, str]]:
    return [("task", ", ".join(f"{k}={v}" for k, v in s["task"].items() if v not in (None, [], "")) or "-"),
            ("head", ", ".join(f"{k} {v}" for k, v in s["head"].items()) or "none")]


def _rows(s: dict) -> list[tuple[str, str]]:
    st, base = s["storage"], s["base_model"]
    return [
        *_method_rows(s),
        ("compute path", s["compute_path"]),
        ("adapted params N", f"{s['n_params']:,} ({s['compression']:,.1f} weights per theta entry)"),
        ("targets", _targets_line(s["targets"])),
        ("base model", f"{base.get('name_or_path') or '?'} (revision {base.get('revision') or 'default'}, "
                       f"{base.get('dtype') or '?'})"),
        ("fingerprint", str(base.get("fingerprint"))),
        *_task_rows(s),
        ("storage", f"{_size(st['gpart_bytes'])} on disk vs LoRA r={LORA_RANK} "
                    f"{_size(st[f'lora_r{LORA_RANK}_bytes_fp32'])} (fp32): {st['ratio_vs_lora']:,.1f}× smaller"),
        ("versions", ", ".join(f"{k} {v}" for k, v in s["versions"].items())),
        ("recipe", ", ".join(sorted(s["recipe"])) if s["recipe"] else "-"),
    ]


def _unresolved_rows(s: dict) -> list[tuple[str, str]]:
    targets = s["target_modules"]
    base = s["base_model"]
    return [
        *_method_rows(s),
        ("targets", (f"regular expression {targets}" if isinstance(targets, str) else ", ".join(targets))
                    + f" (biases {'adapted' if s['bias'] else 'not adapted'})"),
        ("base model", f"{base.get('name_or_path') or 'not recorded'} (revision {base.get('revision') or 'default'})"),
        *_task_rows(s),
        ("size", _size(s["size_bytes"])),
        ("base not used", s["unresolved"]["why"]),
        ("--model BASE adds", s["unresolved"]["with_model"]),
    ]


def _imported_line(source: dict) -> str:
    raw = source.get("adapter_config") or {}
    backend = source.get("assignment_backend")
    if backend is None:  # a .gpart converted by an older gpart
        backend = authors_format.backend_line(raw) if "assignment_backend" in raw else (
            "absent; the gpart that converted this file read it as stateless: convert the authors' adapter again")
    return f"{source.get('format')} (assignment_backend {backend}; proj_seed {raw.get('proj_seed')}, " \
           f"bias {raw.get('bias', 'none')})"
