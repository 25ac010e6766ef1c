"""benchmarks/RESULTS.md stays the short reference users read: one table per benchmark, every link
to a report (and every report linked from it) resolving, no team-internal labels. The
investigations themselves live in benchmarks/reports/."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "RESULTS.md"
MAX_LINES = 320

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (links in code are not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in _prose(md.read_text()) if re.match(r"#{1,6} ", line)}


def _links(md: Path) -> list[tuple[str, str]]:
    """(path, fragment) of every relative link in ``md``; path "" for a link within the file."""
    found = []
    for line in _prose(md.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):                       # http:, https:, mailto:
                continue
            path, _, frag = target.partition("#")
            found.append((path, frag))
    return found


def _sections(text: str) -> dict[str, list[str]]:
    """Each ``## `` section's lines (its ``###`` subsections included), by heading."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in _prose(text):
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def _has_table(lines: list[str]) -> bool:
    """A markdown table: a '|' row followed by its '|---|' separator row."""
    return any(a.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", b.strip())
               for a, b in zip(lines, lines[1:]))


def test_helpers_on_known_markdown():
    """The checks below rest on these readings of markdown; pin them on hand-written cases."""
    assert _anchor("Host overhead of the trainer's step on the CPU (2026-12-06)") == \
        "host-overhead-of-the-trainers-step-on-the-cpu-2026-12-06"
    assert _anchor("First GPU run: `make gpu-check` on an H200 (2026-11-26)") == \
        "first-gpu-run-make-gpu-check-on-an-h200-2026-11-26"
    assert _has_table(["text", "", "| a | b |", "|---|---|", "| 1 | 2 |"])
    assert not _has_table(["| a | b |", "no separator", "- list"])
    secs = _sections("# T\n\n## One\n\n| a |\n|---|\n\n### Sub\n\n## Two\n\n```\n## not a heading\n```\n")
    assert list(secs) == ["One", "Two"] and _has_table(secs["One"]) and not _has_table(secs["Two"])


def test_results_is_short():
    n = len(RESULTS.read_text().splitlines())
    assert n <= MAX_LINES, (f"benchmarks/RESULTS.md has {n} lines (at most {MAX_LINES}): keep one table per "
                            "benchmark there and move the write-up to a dated report in benchmarks/reports/")


def test_every_section_has_a_table():
    sections = _sections(RESULTS.read_text())
    assert sections, "benchmarks/RESULTS.md has no '## ' section"
    missing = [name for name, lines in sections.items() if not _has_table(lines)]
    assert not missing, f"benchmarks/RESULTS.md sections without a table: {missing}"


def _broken_links(md: Path) -> list[str]:
    """The relative links of ``md`` whose file does not exist, or whose '#anchor' (in ``md`` or in the
    linked markdown file) names no heading there."""
    broken = []
    for path, frag in _links(md):
        target = (md.parent / path).resolve() if path else md
        if not target.exists():
            broken.append(f"{md.name}: {path}: no such file")
        elif frag and target.suffix == ".md" and frag not in _anchors(target):
            broken.append(f"{md.name}: {path}#{frag}: no such heading")
    return broken


def test_broken_links_found(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "r.md").write_text("# R\n\n## Part one (2026-01-01)\n")
    md = tmp_path / "RESULTS.md"
    md.write_text("# Top\n\n[ok](reports/r.md) [ok](reports/r.md#part-one-2026-01-01) [ok](#top)\n"
                  "[gone](reports/missing.md) [bad](reports/r.md#part-two) [bad](#nowhere) [web](https://x.org/y)\n"
                  "```\n[in code](reports/also-missing.md)\n```\n")
    assert _broken_links(md) == ["RESULTS.md: reports/missing.md: no such file",
                                 "RESULTS.md: reports/r.md#part-two: no such heading",
                                 "RESULTS.md: #nowhere: no such heading"]


def test_results_links_resolve():
    broken = _broken_links(RESULTS)
    assert not broken, "benchmarks/RESULTS.md has broken links:\n" + "\n".join(broken)


def test_reports_links_resolve_and_each_report_is_linked():
    linked = {(RESULTS.parent / p).resolve() for p, _ in _links(RESULTS) if p}
    reports = sorted((BENCH / "reports").glob("*.md"))
    assert reports, "benchmarks/reports/ holds no report"
    orphans = [r.name for r in reports if r.resolve() not in linked]
    assert not orphans, f"reports not linked from benchmarks/RESULTS.md: {orphans}"
    broken = [line for report in reports for line in _broken_links(report)]
    assert not broken, "broken links in benchmarks/reports/:\n" + "\n".join(broken)


def test_results_has_no_team_internal_labels():
    """Session diaries keep their labels in the reports; RESULTS.md speaks to users."""
    labels = re.compile(r"\bengineer g\d*\b|\bsession \d+\b|\bsession\d+\b|\bissue #?\d+ item\b", re.I)
    hits = [f"{i}: {m.group(0)}" for i, line in enumerate(RESULTS.read_text().splitlines(), 1)
            for m in labels.finditer(line)]
    assert not hits, "team-internal labels in benchmarks/RESULTS.md:\n" + "\n".join(hits)
