"""The package's folders are its layers: each module's layer is read from its path, and a module imports only its own
layer and the layers below it, with no import cycles and no other module's private names (checked on the source with
ast, imports inside functions included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpart_cli"
# Bottom to top. "base" is the package's own root modules (errors, atomic, versions, rng); "api" is the package
# itself (`gpart_cli/__init__.py`, the public API) and `__main__`, which may import anything.
LAYERS = ["base", "partition", "kernels", "core", "adapters", "recipe", "data", "evaluation", "train", "commands",
          "api"]
WHY = {
    "kernels": "the kernels are speed machinery below the method: they see the partition and rng, not the layer",
    "core": "the method (layer, model surgery, artifact) knows nothing of files, data, training or commands",
    "adapters": "reading and writing models and adapters needs the method, never the recipe, data or training",
    "data": "data is read by evaluation and training, not the reverse",
    "evaluation": "gpart eval scores results; it does not depend on how they were trained",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "api"
    return parts[1] if parts[1] in LAYERS else "base"


def imports_of(path: Path) -> dict[str, set[str]]:
    """{gpart_cli module imported by `path`: the names taken from it}, at top level or inside functions.

    `from pkg import mod` imports the module pkg.mod (not pkg); relative imports are resolved.
    """
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                found.setdefault(a.name, set())
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:
                    found.setdefault(f"{target}.{a.name}", set())
                else:
                    found.setdefault(target, set()).add(a.name)
    return {name: names for name, names in found.items() if name.startswith("gpart_cli")}


def test_every_folder_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - {"base", "api"}


def test_imports_of_resolves_relative_imports():
    # The checker itself: `from .. import rng`, `from . import x` and `from ..a.b import name` resolve to modules.
    assert set(imports_of(PACKAGE / "kernels" / "delta_ops.py")) >= {"gpart_cli.rng", "gpart_cli.kernels.cpu_native",
                                                                      "gpart_cli.kernels.torch_ops"}
    assert "gpart_cli.errors" in imports_of(PACKAGE / "data" / "sft.py")
    assert layer_of("gpart_cli.rng") == "base" and layer_of("gpart_cli.partition") == "partition"
    assert layer_of("gpart_cli.core.layer") == "core" and layer_of("gpart_cli") == "api"


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_upward_imports(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    upward = sorted(f"{m} -> {name}" for m, p in MODULES.items() if layer_of(m) == layer
                    for name in imports_of(p) if layer_of(name) not in allowed)
    assert not upward, f"{WHY.get(layer, 'a layer imports only itself and the layers below')}: {upward}"


def test_no_import_cycles():
    edges = {m: {n for n in imports_of(p) if n in MODULES and n != m and not m.startswith(n + ".")}
             for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state and (cycle := visit(n, path + [n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(MODULES):
        if m not in state and (cycle := visit(m, [m])):
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")


def test_no_private_names_across_modules():
    private = sorted(f"{m} <- {target}.{name}" for m, p in MODULES.items() for target, names in imports_of(p).items()
                     if target != m for name in names if name.startswith("_") and not name.startswith("__"))
    assert not private, f"import a public name (or move the helper where both can use it): {private}"
