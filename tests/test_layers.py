"""The package's layers: each folder imports only the layers below it, no modules import each other in a circle, and
argparse lives in the commands alone.

Layers, bottom to top: the recipes (siim_jax.configs, from configs/), the foundation modules every layer may use
(config_utils, files, metrics, pictures, sharding), data, models, training, inference, evaluation, commands, and
the entry point cli. `siim_jax/__init__.py` names the public API by strings and imports nothing at import time.
Every import counts, also those inside functions: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("configs", "foundation", "data", "models", "training", "inference", "evaluation", "commands", "cli")
FOUNDATION = {"siim_jax.config_utils", "siim_jax.files", "siim_jax.metrics", "siim_jax.pictures", "siim_jax.sharding"}
ARGPARSE_ALLOWED = ("siim_jax.commands", "siim_jax.cli")


def package_modules() -> dict[str, Path]:
    """Module name -> file, for siim_jax/ and for configs/ as the wheel ships it (siim_jax.configs)."""
    modules = {}
    for folder, package in ((ROOT / "siim_jax", "siim_jax"), (ROOT / "configs", "siim_jax.configs")):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement of the file names: `import a.b` -> a.b; `from a import b` -> a and
    a.b (b may be a module or a name in a; callers keep the ones that are modules)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package's __init__ is not counted for its submodules)."""
    graph = {}
    for name, path in modules.items():
        targets = {target for target in imported_names(path) if target in modules and target != name}
        # `from siim_jax.data import rle` names both siim_jax.data and siim_jax.data.rle: keep the module itself.
        graph[name] = {target for target in targets if not any(other.startswith(target + ".") for other in targets)}
    return graph


def layer_of(module: str) -> str | None:
    """The module's layer; None for the package's root (the public API)."""
    if module == "siim_jax":
        return None
    if module in FOUNDATION:
        return "foundation"
    if module == "siim_jax.cli":
        return "cli"
    return module.split(".")[1]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if layer_of(source) is not None and rank[layer_of(target)] > rank[layer_of(source)]
    )


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for module in package_modules():
        layer = layer_of(module)
        assert layer is None or layer in LAYERS, f"{module} lies in no layer ({layer}); add it to LAYERS"


def test_no_import_runs_up_a_layer():
    upward = upward_imports(import_graph(package_modules()))
    assert not upward, "imports that run up a layer:\n" + "\n".join(f"  {a} -> {b}" for a, b in upward)


def test_no_modules_import_each_other_in_a_circle():
    found = circles(import_graph(package_modules()))
    assert not found, "modules importing each other in a circle:\n" + "\n".join(f"  {c}" for c in found)


def test_the_public_api_imports_nothing_at_import_time():
    assert not import_graph(package_modules())["siim_jax"]


def test_argparse_only_in_the_commands():
    users = [name for name, path in package_modules().items()
             if "argparse" in imported_names(path) and not name.startswith(ARGPARSE_ALLOWED)]
    assert not users, f"argparse outside siim_jax/commands and siim_jax/cli.py: {users}"


@pytest.mark.parametrize(
    ("graph", "upward", "circle"),
    [
        # the old cv <-> tune pair, and training reaching up for inference
        ({"siim_jax.evaluation.cv": {"siim_jax.evaluation.tune"},
          "siim_jax.evaluation.tune": {"siim_jax.evaluation.cv"},
          "siim_jax.training.loop": {"siim_jax.inference.overlays"}, "siim_jax.inference.overlays": set()},
         [("siim_jax.training.loop", "siim_jax.inference.overlays")],
         [["siim_jax.evaluation.cv", "siim_jax.evaluation.tune"]]),
        # a longer circle across layers: each edge but the last runs down
        ({"siim_jax.commands.predict": {"siim_jax.inference.submission"},
          "siim_jax.inference.submission": {"siim_jax.data.rle"}, "siim_jax.data.rle": {"siim_jax.commands.predict"}},
         [("siim_jax.data.rle", "siim_jax.commands.predict")],
         [["siim_jax.commands.predict", "siim_jax.data.rle", "siim_jax.inference.submission"]]),
    ],
)
def test_the_checks_find_planted_faults(graph, upward, circle):
    assert upward_imports(graph) == upward
    assert circles(graph) == circle


def test_imported_names_reads_deferred_and_from_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import siim_jax.data.rle\n\ndef f():\n    from siim_jax.training import loop\n")
    assert {"siim_jax.data.rle", "siim_jax.training", "siim_jax.training.loop"} <= imported_names(source)


def test_every_public_name_resolves():
    import siim_jax

    missing = [name for name in siim_jax.__all__ if getattr(siim_jax, name, None) is None]
    assert not missing, f"public names that resolve to nothing: {missing}"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        siim_jax.not_a_name  # noqa: B018
