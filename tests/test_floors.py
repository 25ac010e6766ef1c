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
