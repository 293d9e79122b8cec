"""The package's import rule, by walking its modules' imports: kernels never import ops (or anything
above them), and no module imports an underscore name from another fastalign module."""

from __future__ import annotations

import ast
import pathlib

import fastalign

ROOT = pathlib.Path(fastalign.__file__).parent


def _imports(path: pathlib.Path):
    """(module imported, names imported) for every ``import`` / ``from ... import`` in the file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _module(path: pathlib.Path) -> str:
    return ".".join(("fastalign",) + path.relative_to(ROOT).with_suffix("").parts)


def test_kernels_import_no_layer_above_them():
    above = ("fastalign.ops", "fastalign.losses", "fastalign.integrations", "fastalign.bench", "fastalign.reference")
    bad = [(_module(p), mod) for p in sorted((ROOT / "kernels").glob("*.py"))
           for mod, _ in _imports(p) if mod.startswith(above) or mod == "fastalign"]
    assert not bad, f"kernels import the layers above them: {bad}"


def test_no_cross_module_underscore_names():
    bad = []
    for p in sorted(ROOT.rglob("*.py")):
        me = _module(p)
        for mod, names in _imports(p):
            if mod.startswith("fastalign") and mod != me:
                bad += [(me, f"{mod}.{n}") for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, f"underscore names imported across modules: {bad}"
