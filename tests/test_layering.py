"""The package's import rule, by walking its modules' imports: kernels never import ops (or anything
above them), and no module imports an underscore name from another fastalign module."""

from __future__ import annotations

import ast
import pathlib

import fastalign

ROOT = pathlib.Path(fastalign.__file__).parent


def _imports(path: pathlib.Path, module: str | None = None):
    """(module imported, names imported) for every ``import`` / ``from ... import`` in the file (the module
    ``module``, by default its own name), function-level imports included; relative imports
    (``from ..ops import x``) resolved to absolute module names."""
    tree = ast.parse(path.read_text())
    package = (module or _module(path)).split(".")[: -1 if path.name != "__init__.py" else None]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("fastalign",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def test_kernels_import_no_layer_above_them():
    above = ("fastalign.ops", "fastalign.losses", "fastalign.integrations", "fastalign.bench", "fastalign.reference")
    bad = [
        (_module(p), mod)
        for p in sorted((ROOT / "kernels").glob("*.py"))
        for mod, _ in _imports(p)
        if mod.startswith(above) or mod == "fastalign"
    ]
    assert not bad, f"kernels import the layers above them: {bad}"


def test_no_cross_module_underscore_names():
    bad = []
    for p in sorted(ROOT.rglob("*.py")):
        me = _module(p)
        for mod, names in _imports(p):
            if mod.startswith("fastalign") and mod != me:
                bad += [(me, f"{mod}.{n}") for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, f"underscore names imported across modules: {bad}"


def test_no_underscore_attributes_of_other_modules():
    """``from fastalign.ops import lm_head`` then ``lm_head._private``: the same crossing, through an attribute."""
    bad = []
    for p in sorted(ROOT.rglob("*.py")):
        me = _module(p)
        bound = {}  # local name -> the fastalign module (or module attribute) it names
        for mod, names in _imports(p):
            if not mod.startswith("fastalign"):
                continue
            bound.update({n: f"{mod}.{n}" for n in names} if names else {mod.split(".")[0]: mod})
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append((me, f"{bound[node.value.id]}.{node.attr}"))
    assert not bad, f"underscore names used across modules: {bad}"


def test_the_walk_sees_relative_and_nested_imports(tmp_path):
    """What the checks above rest on: relative imports resolved, imports inside functions found."""
    assert _module(ROOT / "kernels" / "__init__.py") == "fastalign.kernels"
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from ..ops import lm_head\n    from . import tuning\n    from .rows import _x\n")
    assert list(_imports(src, "fastalign.kernels.x")) == [
        ("fastalign.ops", ["lm_head"]),
        ("fastalign.kernels", ["tuning"]),
        ("fastalign.kernels.rows", ["_x"]),
    ]
