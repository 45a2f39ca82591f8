"""The project's own import graph, read from the source with ast: no circle among its modules
(study/'s files import downwards: run -> analyze -> estimate -> plan), and csnn/ never imports
study/ (DESIGN.md: study uses csnn, never the reverse). Imports inside functions count: they
are how a circle hides."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("csnn", "study")


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages under root."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The project modules that module `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import csnn.train.x` where only csnn.train is ours
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The circles of the graph: its strongly connected components of more than one module
    (Tarjan's algorithm), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_finder_sees_a_circle_and_a_climbing_import(tmp_path):
    """The checks below can fail: a made-up package with a circle hidden in a function,
    through `from pkg import mod` and a relative import, and a csnn file importing study."""
    (tmp_path / "study").mkdir()
    (tmp_path / "csnn").mkdir()
    (tmp_path / "study" / "__init__.py").write_text("")
    (tmp_path / "csnn" / "__init__.py").write_text("")
    (tmp_path / "study" / "a.py").write_text("from study import b\n")
    (tmp_path / "study" / "b.py").write_text("import os\n\ndef f():\n    from .c import x\n")
    (tmp_path / "study" / "c.py").write_text("import study.a\nx = 1\n")
    (tmp_path / "study" / "d.py").write_text("from study.a import b\n")  # into the circle, not part of it
    (tmp_path / "csnn" / "m.py").write_text("def g():\n    from study.d import b\n")
    g = graph(tmp_path)
    assert g["study.b"] == {"study.c"} and g["csnn.m"] == {"study.d"}
    assert cycles(g) == [["study.a", "study.b", "study.c"]]


def test_no_circle_among_the_projects_modules():
    g = graph()
    assert {"study.run", "study.estimate", "study.plan", "csnn.train", "csnn.cli"} <= set(g)
    assert cycles(g) == [], "import circles: " + "; ".join(" <-> ".join(c) for c in cycles(g))


def test_csnn_imports_nothing_of_study():
    climbing = {m: sorted(t for t in ts if t.split(".")[0] == "study")
                for m, ts in graph().items() if m.split(".")[0] == "csnn"}
    assert not {m: t for m, t in climbing.items() if t}, climbing
