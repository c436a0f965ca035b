"""The import graph of shards, datagen and training, read by parsing every .py file (nothing imported).

Two rules, lazy imports inside functions included (only ``if TYPE_CHECKING:`` blocks are left out):
no import cycle between modules, and imports point one way, ``shards`` <- ``datagen`` <- ``training``
(shards imports neither; datagen never imports training).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "datagen", "training")
LAYER = {"shards": 0, "datagen": 1, "training": 2}  # a module may import its own layer or a lower one


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _type_checking_only(node):
            children = node.orelse  # the else branch runs
        stack.extend(children)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports: ``from pkg import sub`` counts as ``pkg.sub`` when that
    is a module, else as ``pkg``."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:  # ``import a.b.c`` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def wrong_direction(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import from a lower layer into a higher one."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]])


def test_no_import_cycles():
    graph = import_graph()
    assert "datagen.cli" in graph and "shards.writer" in graph and "training.train" in graph
    assert cycles(graph) == []


def test_imports_point_from_training_to_datagen_to_shards():
    assert wrong_direction(import_graph()) == []


# training's packages, bottom up: a package may import its own modules and those of a lower rank, never a
# sibling's (same rank) or a higher one. The entry points (``python -m training.train`` etc.) sit on top.
TRAINING_RANK = {
    "training.layout": 0,
    "training.model": 1, "training.data": 1,
    "training.inference": 2,
    "training.evaluation": 3, "training.trainer": 3,
    "training": 4,
}


def training_package(module: str) -> str:
    parts = module.split(".")
    pkg = ".".join(parts[:2])
    return pkg if pkg in TRAINING_RANK else "training"


def training_wrong_direction(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import between training's packages that does not point down."""
    out = []
    for a, targets in graph.items():
        if not a.startswith("training"):
            continue
        for b in targets:
            if not b.startswith("training"):
                continue
            pa, pb = training_package(a), training_package(b)
            if pa != pb and TRAINING_RANK[pb] >= TRAINING_RANK[pa]:
                out.append(f"{a} -> {b}")
    return sorted(out)


def test_training_packages_import_downward_only():
    graph = import_graph()
    packages = {training_package(m) for m in graph if m.startswith("training")}
    assert packages == set(TRAINING_RANK)  # a new package gets a rank here
    assert training_wrong_direction(graph) == []


def test_training_folders_stay_small():
    """The layout shows the architecture: no folder of training/ holds more than about twelve modules."""
    for folder in [ROOT / "training", *(p for p in (ROOT / "training").iterdir() if p.is_dir())]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 12, (folder, len(modules))


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_find_lazy_cycles_and_upward_imports(tmp_path):
    _write(tmp_path, {
        "shards/__init__.py": "",
        "shards/a.py": "def f():\n    from datagen.b import g\n",  # lazy, and upward
        "datagen/__init__.py": "",
        "datagen/b.py": "from shards import a\nimport datagen.c.d\n",
        "datagen/c/__init__.py": "",
        "datagen/c/d.py": "from ..b import x\nfrom typing import TYPE_CHECKING\n"
                          "if TYPE_CHECKING:\n    from training.t import T\n",  # type-only: not an import
        "training/__init__.py": "",
        "training/t.py": "from datagen import b\nfrom shards.a import f\n",
    })
    graph = import_graph(tmp_path)
    assert training_wrong_direction({"training.model.x": {"training.data.y", "training.layout.z"},
                                     "training.trainer.t": {"training.model.x", "training.train"},
                                     "training.layout.z": {"training.layout.w"}}) == [
        "training.model.x -> training.data.y", "training.trainer.t -> training.train"]
    assert graph["datagen.b"] == {"shards.a", "datagen.c.d"}
    assert graph["datagen.c.d"] == {"datagen.b"}
    assert graph["training.t"] == {"datagen.b", "shards.a"}
    assert cycles(graph) == [["datagen.b", "datagen.c.d", "shards.a"]]
    assert wrong_direction(graph) == ["shards.a -> datagen.b"]
