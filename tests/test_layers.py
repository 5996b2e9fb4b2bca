"""The package's layers: a module imports only modules of its own layer or of lower layers, never upward.

Every import counts, at module level and inside functions (a lazy import is still a dependency), read
with ``ast`` from the source. Within a layer imports are allowed but must not form a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "segx_helpers"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first. Module names are relative to the package; "segx_helpers" is the package itself (__init__).
LAYERS = (
    ("base: files and map validators", ("segx_helpers", "io", "saliency", "data.augmentation")),
    ("data: the dataset format, generators, converters, torch datasets",
     ("data", "data.format", "data.real", "data.synthetic", "data.torch_dataset")),
    ("scores: metrics, SegX, SegU", ("metrics", "segx", "segu")),
    ("analysis: the one analysis path, figures", ("analysis", "viz")),
    ("models, training loop, explanation maps", ("models", "training", "explain")),
    ("results and checkpoints: what the layers below produce, on disk", ("results", "checkpoints")),
    ("recipes: what the notebooks call", ("notebook", "mask_sources", "training_recipes", "explanation_recipes")),
    ("studies: shortcut ground truth, training with the mask, DDP training, the explorer",
     ("shortcut", "mask_training", "distributed", "widgets")),
    ("entry points: audit, command line, runner, report, book", ("audit", "cli", "runner", "report", "book",
                                                                 "__main__")),
)
LAYER_OF = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}


def package_modules() -> dict[str, Path]:
    """Module name (relative to the package, the package itself as ``segx_helpers``) -> file."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or PACKAGE] = path
    return out


def imported_modules(module: str, source: str, known: set[str]) -> set[str]:
    """Package modules that ``source`` (the module ``module``, relative name) imports, anywhere in it."""
    is_package = module == PACKAGE or any(k.startswith(module + ".") for k in known)
    package_parts = [] if module == PACKAGE else module.split(".")
    if not is_package:
        package_parts = package_parts[:-1]

    def resolve(parts: list[str]) -> str | None:
        # the longest prefix of ``parts`` that is a module of the package
        for end in range(len(parts), -1, -1):
            name = ".".join(parts[:end]) or PACKAGE
            if name in known:
                return name
        return None

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, *rest = alias.name.split(".")
                if top == PACKAGE:
                    found.add(resolve(rest))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[:len(package_parts) - node.level + 1]
            else:
                top, *rest = (node.module or "").split(".")
                if top != PACKAGE:
                    continue
                base, node_module = rest, None
            if node.level:
                node_module = node.module
            parts = base + (node_module.split(".") if node_module else [])
            for alias in node.names:  # ``from . import distributed`` imports a module
                found.add(resolve(parts + [alias.name]))
    found.discard(None)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {m: imported_modules(m, path.read_text(encoding="utf-8"), set(modules)) for m, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} (layer {LAYER_OF[m]}: {LAYERS[LAYER_OF[m]][0]}) imports {d} "
            f"(layer {LAYER_OF[d]}: {LAYERS[LAYER_OF[d]][0]})"
            for m, deps in sorted(graph.items()) for d in sorted(deps)
            if m in LAYER_OF and d in LAYER_OF and LAYER_OF[d] > LAYER_OF[m]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                found.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_every_module_has_a_layer():
    modules = set(package_modules())
    assert not modules - set(LAYER_OF), f"modules without a layer (add them to LAYERS): {sorted(modules - set(LAYER_OF))}"
    assert not set(LAYER_OF) - modules, f"LAYERS names modules that do not exist: {sorted(set(LAYER_OF) - modules)}"


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_pipeline_module_is_gone():
    assert "pipeline" not in package_modules()


@pytest.mark.parametrize("module, source, upward", [
    ("saliency", "def f():\n    from .audit import run_audit\n", "audit"),
    ("data.format", "from ..explain import explain\n", "explain"),
    ("metrics", "import segx_helpers.training_recipes as recipes\n", "training_recipes"),
    ("results", "from segx_helpers.mask_sources import mask_probabilities\n", "mask_sources"),
    ("analysis", "from . import distributed\n", "distributed"),
])
def test_the_check_sees_upward_imports_anywhere(module, source, upward):
    """The checker's own test: an upward import at module level, in a function, relative or absolute, is found."""
    known = set(package_modules())
    graph = {module: imported_modules(module, source, known)}
    assert graph[module] == {upward}
    assert len(upward_imports(graph)) == 1


def test_the_check_sees_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
