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

# Lowest first: each layer is a folder of the package (its ``__init__`` and every module in it). The package's own
# ``__init__`` (the version) is below every layer, ``__main__`` (``python -m segx_helpers``) above.
LAYERS = (
    ("data", "files, the dataset format, generators, converters, torch datasets"),
    ("scores", "the saliency map, SegX, SegU, metrics, selective prediction, the one analysis path"),
    ("models", "networks, the training loop, checkpoints, where masks come from"),
    ("explain", "explanation maps, one module per method family behind a registry"),
    ("workflows", "the reusable steps: paths and run settings, train, explain and score a split, results, summary"),
    ("studies", "the shortcut ground truth, annotated artefacts, training with the mask"),
    ("cli", "every command: segx audit / segx train (DDP), the notebook runner, the book, dataset conversion"),
    ("tutorial", "what only the notebooks use: figures, widgets, the notebooks' one-call analyses"),
)
LAYER_NAMES = [folder for folder, _ in LAYERS]


def layer_of(module: str) -> int | None:
    """Layer index of a module (relative dotted name; the package itself is ``segx_helpers``)."""
    if module == PACKAGE:
        return -1
    if module == "__main__":
        return len(LAYERS)
    folder = module.split(".")[0]
    return LAYER_NAMES.index(folder) if folder in LAYER_NAMES else None


def describe(module: str) -> str:
    i = layer_of(module)
    return f"{module} (layer {i}: {LAYERS[i][0] if 0 <= i < len(LAYERS) else 'package'})"


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
    return [f"{describe(m)} imports {describe(d)}"
            for m, deps in sorted(graph.items()) for d in sorted(deps)
            if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)]


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


def test_every_module_sits_in_a_layer_folder():
    modules = set(package_modules())
    outside = sorted(m for m in modules if layer_of(m) is None)
    assert not outside, f"modules outside the layer folders {LAYER_NAMES} (move them into one): {outside}"
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYER_NAMES), f"folders {sorted(folders)} differ from the layers {LAYER_NAMES}"
    assert all((ROOT / folder / "__init__.py").is_file() for folder in LAYER_NAMES)


def test_the_readme_package_table_lists_the_folders_in_layer_order_with_every_module():
    """The README's package table is the folder tree: one row per layer folder, lowest first, naming its modules."""
    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `segx_helpers.")]
    folders = [row.split("`")[1].removeprefix("segx_helpers.").split(".")[0].rstrip("/") for row in rows]
    assert folders == LAYER_NAMES
    for row, folder in zip(rows, folders):
        modules = sorted(p.stem for p in (ROOT / folder).glob("*.py") if p.stem != "__init__")
        missing = [m for m in modules if f"`{m}`" not in row]
        assert not missing, f"README's row for {folder}/ does not name {missing}"


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_commands_and_studies_stand_on_the_workflows_not_on_the_tutorial():
    """``cli/`` and ``studies/`` import nothing from ``tutorial/`` (the layer order says so; this names the rule)."""
    graph = import_graph()
    offending = [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
                 if m.split(".")[0] in ("cli", "studies") and d.split(".")[0] == "tutorial"]
    assert offending == []


def test_every_command_line_entry_point_is_in_cli():
    """``if __name__ == "__main__"`` appears only in ``cli/`` (and the package's ``__main__``)."""
    outside = [m for m, path in package_modules().items()
               if "__name__ == \"__main__\"" in path.read_text(encoding="utf-8")
               and layer_of(m) != LAYER_NAMES.index("cli") and m != "__main__"]
    assert outside == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("module, source, upward", [
    ("scores.saliency", "def f():\n    from ..cli.audit import run_audit\n", "cli.audit"),
    ("data.format", "from ..explain.api import explain\n", "explain.api"),
    ("scores.metrics", "import segx_helpers.workflows.training_recipes as recipes\n", "workflows.training_recipes"),
    ("models.masks", "from segx_helpers.workflows.results import Results\n", "workflows.results"),
    ("cli.audit", "from segx_helpers.tutorial.viz import overlay\n", "tutorial.viz"),
    ("scores.analysis", "from ..cli import distributed\n", "cli.distributed"),
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
