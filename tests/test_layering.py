"""Imports go one way: napari/cli → jobs → metrics → heatmap/io/masks → space; the engine imports no job or UI code.

The import graph is read from the source (every ``import`` statement, including those inside
functions), so a lazy import cannot hide an inversion.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medcam3d"
ENGINE = ("medcam3d.explainer", "medcam3d.explanation", "medcam3d.logits", "medcam3d.placement", "medcam3d.methods", "medcam3d.hooks",
          "medcam3d.capture",
          "medcam3d.targets", "medcam3d.layers", "medcam3d.cam_head", "medcam3d.input_rank", "medcam3d.output_grids",
          "medcam3d.torchscript", "medcam3d.sliding",
          "medcam3d.model_io")
GEOMETRY = ("medcam3d.space", "medcam3d.io", "medcam3d.heatmap", "medcam3d.scan_maps", "medcam3d.masks", "medcam3d.orientation")
UI = ("medcam3d.cli", "medcam3d.napari", "medcam3d.__main__")
JOBS = ("medcam3d.jobs",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}  # annotations only, never executed
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import io`
    return {m for m in found if m == "medcam3d" or m.startswith("medcam3d.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in modules:  # `medcam3d.io.read` → `medcam3d.io`
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported != "medcam3d":
                targets.add(imported)
        graph[name] = targets
    return graph


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


GRAPH = _graph()


@pytest.mark.parametrize("layer, forbidden", [
    (ENGINE, JOBS + UI + ("medcam3d.metrics",)),
    (("medcam3d.metrics",), JOBS + UI),
    (GEOMETRY, JOBS + UI + ("medcam3d.metrics",)),
    (("medcam3d.space", "medcam3d.orientation"), ("medcam3d.io", "medcam3d.heatmap", "medcam3d.masks")),
    (JOBS, UI),
])
def test_imports_go_one_way(layer, forbidden):
    wrong = sorted(f"{module} imports {target}" for module, targets in GRAPH.items() if _within(module, layer)
                   for target in targets if _within(target, forbidden))
    assert not wrong, "\n".join(wrong)


# medcam3d.io, one concept per module: each imports only those before it (the package last).
IO_ORDER = ("medcam3d.io._common", "medcam3d.io.limits", "medcam3d.io.streaming", "medcam3d.io.nifti", "medcam3d.io.itk_headers", "medcam3d.io.itk", "medcam3d.io.dicom",
            "medcam3d.io.reading", "medcam3d.io.channels", "medcam3d.io.info", "medcam3d.io.writing", "medcam3d.io")


def test_io_modules_import_one_way():
    assert set(IO_ORDER) == {m for m in GRAPH if _within(m, ("medcam3d.io",))}, "place each io module in IO_ORDER"
    wrong = [f"{module} imports {target}" for i, module in enumerate(IO_ORDER)
             for target in sorted(GRAPH[module]) if target in IO_ORDER and target not in IO_ORDER[:i]]
    assert not wrong, "\n".join(wrong)


# medcam3d.models, one concept per module: each imports only those before it (the package last).
MODELS_ORDER = ("medcam3d.models.rules", "medcam3d.models.budget", "medcam3d.models.activations", "medcam3d.models.build",
                "medcam3d.models.weights", "medcam3d.models.rank", "medcam3d.models.bundles", "medcam3d.models.nnunet", "medcam3d.models.loading",
                "medcam3d.models")


def test_models_modules_import_one_way():
    assert set(MODELS_ORDER) == {m for m in GRAPH if _within(m, ("medcam3d.models",))}, "place each module in MODELS_ORDER"
    wrong = [f"{module} imports {target}" for i, module in enumerate(MODELS_ORDER)
             for target in sorted(GRAPH[module]) if target in MODELS_ORDER and target not in MODELS_ORDER[:i]]
    assert not wrong, "\n".join(wrong)


# medcam3d.weak, one concept per module: each imports only those before it (the package last).
WEAK_ORDER = ("medcam3d.weak.seeds", "medcam3d.weak.losses", "medcam3d.weak.refinement", "medcam3d.weak.training_set",
              "medcam3d.weak.training", "medcam3d.weak.segmenter_files", "medcam3d.weak.prediction", "medcam3d.weak")


def test_weak_modules_import_one_way():
    assert set(WEAK_ORDER) == {m for m in GRAPH if _within(m, ("medcam3d.weak",))}, "place each module in WEAK_ORDER"
    wrong = [f"{module} imports {target}" for i, module in enumerate(WEAK_ORDER)
             for target in sorted(GRAPH[module]) if target in WEAK_ORDER and target not in WEAK_ORDER[:i]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if target == "medcam3d.__init__":
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


# The packages split by concept (issue 24): each module imports only those before it (the package last).
PACKAGE_ORDERS = {
    "medcam3d.config": ("medcam3d.config.values", "medcam3d.config.yaml_reader", "medcam3d.config.records",
                        "medcam3d.config.parsing", "medcam3d.config"),
    "medcam3d.space": ("medcam3d.space.grid", "medcam3d.space.feature", "medcam3d.space.axes", "medcam3d.space.resampling",
                       "medcam3d.space"),
    "medcam3d.receptive_field": ("medcam3d.receptive_field.field", "medcam3d.receptive_field.view", "medcam3d.receptive_field.ops",
                                 "medcam3d.receptive_field.graph", "medcam3d.receptive_field.probe",
                                 "medcam3d.receptive_field.measuring", "medcam3d.receptive_field"),
    "medcam3d.cli": ("medcam3d.cli.arguments", "medcam3d.cli.tables", "medcam3d.cli.runner", "medcam3d.cli.demo",
                     "medcam3d.cli.commands", "medcam3d.cli.parser", "medcam3d.cli.entry", "medcam3d.cli"),
}


@pytest.mark.parametrize("package", sorted(PACKAGE_ORDERS))
def test_split_packages_import_one_way(package):
    order = PACKAGE_ORDERS[package]
    assert set(order) == {m for m in GRAPH if _within(m, (package,))}, f"place each {package} module in PACKAGE_ORDERS"
    wrong = [f"{module} imports {target}" for i, module in enumerate(order)
             for target in sorted(GRAPH[module]) if target in order and target not in order[:i]]
    assert not wrong, "\n".join(wrong)


def test_split_packages_import_no_private_names():
    found = [text for package in PACKAGE_ORDERS for path in sorted((PACKAGE / package.split(".")[1]).glob("*.py"))
             for text in _private_imports(path)]
    assert not found, "\n".join(found)


# medcam3d.napari, one concept per module: each imports only those before it (the package last), so that the
# reader, writer, saved outputs, service and widget form no circle, not even through imports inside functions.
NAPARI_ORDER = ("medcam3d.napari._view", "medcam3d.napari._grid", "medcam3d.napari._lazy", "medcam3d.napari._shared",
                "medcam3d.napari._labels", "medcam3d.napari._scan", "medcam3d.napari._outputs", "medcam3d.napari._writer",
                "medcam3d.napari._workers", "medcam3d.napari._reader", "medcam3d.napari._sample_data",
                "medcam3d.napari._models", "medcam3d.napari._masking", "medcam3d.napari._service", "medcam3d.napari._results", "medcam3d.napari._aids", "medcam3d.napari._widget", "medcam3d.napari")


def test_napari_modules_import_one_way():
    assert set(NAPARI_ORDER) == {m for m in GRAPH if _within(m, ("medcam3d.napari",))}, "place each module in NAPARI_ORDER"
    wrong = [f"{module} imports {target}" for i, module in enumerate(NAPARI_ORDER)
             for target in sorted(GRAPH[module]) if target in NAPARI_ORDER and target not in NAPARI_ORDER[:i]]
    assert not wrong, "\n".join(wrong)


def _private_imports(path: Path) -> list[str]:
    """``from <another module> import _name`` in ``path`` (a private name used across modules)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("medcam3d")):
            found.extend(f"{_module_name(path)}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                         for alias in node.names if alias.name.startswith("_") and alias.name != "__version__")
    return found


def test_napari_imports_no_private_names():
    found = [text for path in sorted((PACKAGE / "napari").glob("*.py")) for text in _private_imports(path)]
    assert not found, "\n".join(found)


def test_the_import_checks_see_lazy_imports(tmp_path):
    """A function-level import counts: the checks above would see a circle hidden inside a function."""
    lazy = tmp_path / "medcam3d" / "napari" / "_late.py"
    lazy.parent.mkdir(parents=True)
    lazy.write_text("def f():\n    from ._widget import _secret\n    from ..heatmap import _hidden\n")
    with _package_at(tmp_path / "medcam3d"):
        imported, private = _imports(lazy), _private_imports(lazy)
    assert "medcam3d.napari._widget" in {m.rpartition(".")[0] for m in imported}
    assert len(private) == 2


@contextmanager
def _package_at(root: Path) -> Iterator[None]:
    """Read modules as if the package lived at ``root`` (for files written by a test)."""
    global PACKAGE
    saved, PACKAGE = PACKAGE, root
    try:
        yield
    finally:
        PACKAGE = saved


def test_the_graph_is_read():
    assert "medcam3d.space" in GRAPH["medcam3d.heatmap"]
    assert "medcam3d.jobs.runner" in GRAPH["medcam3d.jobs.cohort"]


def test_the_readme_layout_maps_every_module():
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.find("\n## ", 5)] if "\n## " in layout[5:] else layout
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        if path.name == "__init__.py":
            named = f"{relative.parent.as_posix()}/" in layout
        elif path.parent == PACKAGE:
            named = f"`{relative.as_posix()}`" in layout or f"`{path.name}`" in layout
        else:
            named = path.name in layout
        if not named:
            missing.append(relative.as_posix())
    assert not missing, f"README's Layout section does not mention: {missing}"


def _tiers_from_architecture() -> dict[str, int]:
    """``{module: tier}`` from the picture in docs/architecture.md ("What imports what")."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("### What imports what", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    tiers: dict[str, int] = {}
    for line in block.splitlines():
        words = re.sub(r"\[[^]]*\]", " ", line).split()  # [the tier's name] is not a module
        if len(words) < 3 or words[0] != "tier":
            continue
        level = int(words[1])
        for word in words[2:]:
            module = "medcam3d." + word
            if module in GRAPH or any(m.startswith(module + ".") for m in GRAPH):
                assert module not in tiers, f"{word} is drawn in two tiers"
                tiers[module] = level
    return tiers


def test_the_architecture_picture_is_the_import_graph():
    tiers = _tiers_from_architecture()

    def tier(module: str) -> int | None:
        for prefix, level in tiers.items():
            if _within(module, (prefix,)):
                return level
        return None

    unplaced = sorted(m for m in GRAPH if m != "medcam3d" and tier(m) is None)
    assert not unplaced, f"draw these modules in docs/architecture.md's picture: {unplaced}"
    upward = sorted(f"{module} (tier {tier(module)}) imports {target} (tier {tier(target)})"
                    for module, targets in GRAPH.items() if module != "medcam3d"
                    for target in targets if (tier(target) or 0) > (tier(module) or 0))
    assert not upward, "\n".join(upward)
    assert tiers["medcam3d.space"] < tiers["medcam3d.heatmap"] < tiers["medcam3d.explainer"] < tiers["medcam3d.cli"]
