"""No arrows upward: the package's layers import only downward, checked on the source (ast), not by convention.

Layers, top to bottom: the app (cli, sweep's command) > the training layer (train/, methods, sweep) > evaluation/ >
data/ > the method core (model, layer, groups, partition, artifact, ...) > kernels/. A module may import its own
layer and the layers below it; the rules below list the arrows that would point up.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpart_cli"
# The training layer and the commands.
ABOVE_EVALUATION = ("gpart_cli.train", "gpart_cli.methods", "gpart_cli.sweep", "gpart_cli.cli")
# (importing modules, what they must not import, why)
RULES = [
    ("gpart_cli.kernels", ("gpart_cli.groups", "gpart_cli.layer", "gpart_cli.model"),
     "kernels and their self-checks sit below the layer: the reference ops they check against are kernels.reference"),
    ("gpart_cli.data", ("gpart_cli.evaluation", *ABOVE_EVALUATION),
     "data is read by evaluation and training, not the reverse"),
    ("gpart_cli.evaluation", ABOVE_EVALUATION,
     "gpart eval scores results; it does not depend on how they were trained"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every gpart_cli module `path` imports, at top level or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from . import rng` imports gpart_cli.rng
    return {name for name in found if name.startswith("gpart_cli")}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_imports_of_resolves_relative_imports(tmp_path):
    # The checker itself: a relative import two levels up and a `from . import x` both resolve to module names.
    assert "gpart_cli.errors" in imports_of(PACKAGE / "data" / "sft.py")
    assert {"gpart_cli.groups", "gpart_cli.rng"} <= imports_of(PACKAGE / "model.py")
    assert "gpart_cli.kernels.reference" in imports_of(PACKAGE / "kernels" / "cpu_native.py")


@pytest.mark.parametrize("layer,forbidden,why", RULES, ids=[r[0] for r in RULES])
def test_no_upward_imports(layer, forbidden, why):
    files = [p for p in PACKAGE.rglob("*.py") if _under(_module_name(p), layer)]
    assert files, layer
    upward = sorted(f"{_module_name(p)} -> {name}" for p in files for name in imports_of(p)
                    if any(_under(name, f) for f in forbidden))
    assert not upward, f"{why}: {upward}"
