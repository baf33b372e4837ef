"""The house rules of ARCHITECTURE.md, checked from the source: the six entry files on top, no import cycle among our
modules (lazy imports inside functions count too), and a data engine that never imports torch, not even through
another of our modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_FILES = {"attention.py", "model.py", "llm.py", "data.py", "train.py", "eval.py"}
PACKAGES = ("dataengine", "training", "evaluation", "language", "storage", "tools")


def our_modules() -> dict:
    """{module name: path} of every library module: the entry files and the packages' files."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in PACKAGES:
        found.update({f"{pkg}.{p.stem}": p for p in (ROOT / pkg).glob("*.py") if p.stem != "__init__"})
    return found


def imports_of(path: Path, modules: dict) -> tuple[set, set]:
    """(our modules that path imports, external top-level packages it imports), wherever the import statement is."""
    ours, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` imports pkg.mod when that is one of ours
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                ours.add(name)
            elif name.split(".")[0] not in PACKAGES:
                external.add(name.split(".")[0])
    return ours, external


def import_graph():
    modules = our_modules()
    graph, external = {}, {}
    for name, path in modules.items():
        graph[name], external[name] = imports_of(path, modules)
    return graph, external


def test_top_level_holds_the_six_entry_files():
    assert {p.name for p in ROOT.glob("*.py")} == ENTRY_FILES


def test_no_import_cycle():
    graph, _ = import_graph()
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_data_engine_never_imports_torch():
    graph, external = import_graph()
    for name in (n for n in graph if n.startswith("dataengine.") or n == "storage.atomic"):
        seen, todo = set(), [name]
        while todo:
            mod = todo.pop()
            if mod in seen:
                continue
            seen.add(mod)
            assert "torch" not in external[mod], f"{name} imports torch (through {mod})"
            todo += graph[mod]


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The cycle finder and the torch rule, on a made-up module set: a test that cannot fail proves nothing."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import torch\ndef f():\n    from b import g\n")
    b.write_text("import a\n")
    modules = {"a": a, "b": b}
    assert imports_of(a, modules) == ({"b"}, {"torch"}) and imports_of(b, modules) == ({"a"}, set())
