"""docs/ARCHITECTURE.md's floors are true: every module of the package sits on a floor the doc
names, and no module imports (at module level or inside a function) a module on a higher floor."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mohico"


def doc_floors(text: str) -> dict[str, int]:
    """``{module prefix: floor}`` from the ``floor N  name  mohico.a, mohico.b`` lines of the doc."""
    floors = {}
    for n, modules in re.findall(r"^floor (\d+)\s+\S+\s+(mohico\S*(?:,\s*mohico\S*)*)\s*$", text, flags=re.M):
        for m in modules.split(","):
            floors[m.strip()] = int(n)
    return floors


def floor_of(module: str, floors: dict[str, int]) -> int | None:
    """The floor of the longest prefix of ``module`` that the doc names (None: none does). The bare
    package name ``mohico`` (its ``__init__``, the public API) names only itself."""
    best = None
    for prefix, n in floors.items():
        if (module == prefix or (prefix != "mohico" and module.startswith(prefix + "."))) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, n)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a ``mohico`` module in the source of module ``name``,
    relative ones resolved. ``from a import b`` counts ``a.b`` when that is a module of the package,
    else ``a`` (b is a name defined by ``a``); it also counts ``a`` itself, except the bare package
    ``mohico``, whose ``__init__`` (the public API on the top floor) ``from mohico import dist`` does
    not reach beyond."""
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base != "mohico":
                out.append((node.lineno, base))
            for a in node.names:
                sub = PACKAGE.parent.joinpath(*f"{base}.{a.name}".split("."))
                is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                out.append((node.lineno, f"{base}.{a.name}" if is_module else base))
    return [(line, m) for line, m in out if m == "mohico" or m.startswith("mohico.")]


def upward_imports(path: Path, floors: dict[str, int]) -> list[str]:
    name = module_name(path)
    mine = floor_of(name, floors)
    out = []
    for line, imported in imported_modules(path.read_text(), name, path.name == "__init__.py"):
        theirs = floor_of(imported, floors)
        if theirs is not None and theirs > mine:
            out.append(f"{path.relative_to(ROOT)}:{line}: {name} (floor {mine}) imports {imported} (floor {theirs})")
    return out


def test_doc_names_the_floors():
    floors = doc_floors((ROOT / "docs" / "ARCHITECTURE.md").read_text())
    assert {floors.get("mohico.config"), floors.get("mohico.datasets"), floors.get("mohico.models"),
            floors.get("mohico.eval"), floors.get("mohico.trainer"), floors.get("mohico.launcher")} == {0, 1, 2, 3, 4, 5}, floors
    assert floors["mohico.config"] < floors["mohico.datasets"] < floors["mohico.models"] \
        < floors["mohico.eval"] < floors["mohico.trainer"] < floors["mohico.launcher"]


def test_every_module_has_a_floor_and_imports_none_above_it():
    floors = doc_floors((ROOT / "docs" / "ARCHITECTURE.md").read_text())
    modules = sorted(PACKAGE.rglob("*.py"))
    homeless = [module_name(p) for p in modules if floor_of(module_name(p), floors) is None]
    assert not homeless, f"modules on no floor of docs/ARCHITECTURE.md (add them there): {homeless}"
    upward = [u for p in modules for u in upward_imports(p, floors)]
    assert not upward, "imports that run up a floor:\n" + "\n".join(upward)


def test_the_check_sees_upward_imports():
    """The checker itself: lazy, relative and ``from package import module`` imports are all seen."""
    floors = {"mohico.utils": 0, "mohico.models": 2, "mohico.trainer": 3, "mohico": 4}
    src = ("import json\n"
           "from mohico import errors, models\n"
           "def f():\n    from .trainer import train\n")
    found = {m for _, m in imported_modules(src, "mohico.utils")}
    assert found == {"mohico.errors", "mohico.models", "mohico.trainer", "mohico.trainer.train"}, found
    api = {m for _, m in imported_modules("from mohico import load_encoder\n", "mohico.utils")}
    assert api == {"mohico"}, api            # a name of the top-floor __init__, not a module
    assert floor_of("mohico.trainer.train", floors) == 3 and floor_of("mohico.utils", floors) == 0
    assert floor_of("mohico.utilsx", floors) is None and floor_of("mohico.newmodule", floors) is None
    assert floor_of("mohico", floors) == 4


# --------------------------------------------------------------------------- no import cycle
BENCHMARKS = ROOT / "benchmarks"
TESTS = ROOT / "tests"


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` (module level and inside functions, as
    :func:`imported_modules` sees them), over every module of the package."""
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {name: {m for _, m in imported_modules(p.read_text(), name, p.name == "__init__.py")
                   if m in modules and m != name}
            for name, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module
    (Tarjan), each sorted; [] when the graph is acyclic."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One closed walk through ``component`` (``a -> b -> a``), for the failure message."""
    start, members = component[0], set(component)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w == start]
        fresh = [w for w in nxt if w not in seen]
        if back and (len(path) > 1 or not fresh):
            return " -> ".join(path + [start])
        if not fresh:      # a dead end inside the component: close on any seen member
            return " -> ".join(path + [nxt[0]])
        path.append(fresh[0])
        seen.add(fresh[0])


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (break each: move the shared piece to a module both import):\n" + \
        "\n".join(cycle_path(graph, c) for c in found)


def test_the_cycle_check_sees_cycles():
    """The checker itself: a two-module cycle, a longer one, and a type-only import all count."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycle_path({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c"]) == "a -> b -> c -> a"
    src = ("from typing import TYPE_CHECKING\n"
           "if TYPE_CHECKING:\n    from mohico.config import Config\n")
    assert {m for _, m in imported_modules(src, "mohico.config_validate")} == {"mohico.config"}


# --------------------------------------------------------------------------- benchmarks
def benchmark_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` for every import in a benchmark script, module level and inside
    functions (``import a.b``: names ``[]``; ``from a import b, c``: names ``[b, c]``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node.lineno, node.module or "", [a.name for a in node.names]))
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_attributes(path: Path) -> list[tuple[int, str, str]]:
    """``(line, alias, attribute)`` for every ``alias._private`` where ``alias`` names a module of
    the package (``import mohico.a.b as alias``, ``from mohico.a import b as alias``)."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] == "mohico"})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mohico" and not node.level:
            for a in node.names:
                sub = PACKAGE.parent.joinpath(*f"{node.module}.{a.name}".split("."))
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return [(node.lineno, aliases[node.value.id], node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in aliases and is_private(node.attr)]


def benchmark_violations(paths: list[Path], test_helpers: set[str]) -> list[str]:
    """What a benchmark may not import: a private (underscore) name or module of ``mohico``, or a
    module of ``tests/`` (``tests.x``, or ``x`` for a helper ``tests/x.py`` put on ``sys.path``)."""
    out = []
    for path in paths:
        for line, module, names in benchmark_imports(path):
            top = module.split(".")[0]
            where = f"benchmarks/{path.name}:{line}"
            if top == "tests" or top in test_helpers:
                out.append(f"{where}: imports {module} of tests/ (move what it needs into the package)")
            elif top == "mohico":
                private = [p for p in module.split(".") if is_private(p)] + [n for n in names if is_private(n)]
                if private:
                    out.append(f"{where}: imports private {', '.join(private)} of {module} (make it public there)")
        out += [f"benchmarks/{path.name}:{line}: uses private {attr} of {module} (make it public there)"
                for line, module, attr in private_attributes(path)]
    return out


def benchmark_graph(paths: list[Path]) -> dict[str, set[str]]:
    """``{benchmark: benchmarks it imports}`` (the scripts import each other by file name, with
    ``benchmarks/`` on ``sys.path``)."""
    names = {p.stem for p in paths}
    return {p.stem: {m.split(".")[0] for _, m, _ in benchmark_imports(p) if m.split(".")[0] in names} - {p.stem}
            for p in paths}


def test_benchmarks_import_only_public_names_of_the_package_and_nothing_of_tests():
    """Benchmarks sit above the package: any module of it, only its public names, nothing of tests/."""
    paths = sorted(BENCHMARKS.glob("*.py"))
    assert paths
    bad = benchmark_violations(paths, {p.stem for p in TESTS.glob("*.py")})
    assert not bad, "benchmarks reaching below the package's public names:\n" + "\n".join(bad)


def test_no_import_cycle_among_the_benchmarks():
    graph = benchmark_graph(sorted(BENCHMARKS.glob("*.py")))
    found = cycles(graph)
    assert not found, "import cycles among benchmarks/ (move the shared piece to one module both import):\n" + \
        "\n".join(cycle_path(graph, c) for c in found)


def test_the_benchmark_check_sees_private_names_and_test_helpers(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("import json\n"
                      "from mohico.kernels import bank_nce\n"
                      "def f():\n"
                      "    from mohico.kernels.correlation import _stats_torch, public\n"
                      "    from _videos import fetch_clip\n"
                      "    import tests._dist\n"
                      "    from mohico.x._hidden import y\n"
                      "    from mohico.kernels import correlation_triton as ct\n"
                      "    ct._launch_cfg(1, 2), ct.launch_cfg(1, 2), json._private\n")
    bad = benchmark_violations([script], {"_videos"})
    assert [b.split(": ", 1)[0].rsplit(":", 1)[1] for b in bad] == ["4", "5", "6", "7", "9"], bad
    assert "_stats_torch" in bad[0] and "public," not in bad[0] and "_hidden" in bad[3]
    assert "_launch_cfg of mohico.kernels.correlation_triton" in bad[4]
    other = tmp_path / "other.py"
    other.write_text("from bench import x\n")
    assert cycles(benchmark_graph([script, other])) == []
    script.write_text("import other\n")
    assert cycles(benchmark_graph([script, other])) == [["bench", "other"]]
