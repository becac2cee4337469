"""docs/reliability.rst names only tests that exist, and lists every fault it promises to.

The fault matrix backs each claim with a test named as
``tests/<file>.py::<test>[<parameter id>]``.  These checks make sure the
page can never name a test that was renamed or removed, nor a parameter id
that pytest no longer collects.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.rst"
REFERENCE = re.compile(r"tests/(?P<file>\w+\.py)::(?P<name>\w+)(?:\[(?P<id>[^\]\n]+)\])?")

FAULTS = [
    "kill -9 mid-write",
    "kill -9 mid-compaction or merge",
    "Full disk",
    "Read-only directory",
    "Permission denied",
    "Garbage bytes in a data file",
    "Truncated file",
    "Deleted lock file",
    "Deleted FORMAT file",
    "Fork with threads",
    "Twin storage objects",
    "Redis restart",
    "Lost Redis lock",
]
BACKENDS = ["memory", "msgpack", "shelve", "redis"]


def references() -> list[tuple[str, str, str | None]]:
    """Every (file, test name, parameter id or None) the page names, in order, without repeats."""
    seen: dict[tuple[str, str, str | None], None] = {}
    for match in REFERENCE.finditer(DOC.read_text(encoding="utf-8")):
        seen[(match["file"], match["name"], match["id"])] = None
    return list(seen)


def sections() -> dict[str, str]:
    """Section title -> its text, for every title underlined with ``-``."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    starts = [
        i for i in range(len(lines) - 1)
        if lines[i].strip() and re.fullmatch(r"-+", lines[i + 1]) and len(lines[i + 1]) == len(lines[i])
    ]
    return {
        lines[i]: "\n".join(lines[i + 2 : (starts[n + 1] if n + 1 < len(starts) else len(lines))])
        for n, i in enumerate(starts)
    }


def top_level_functions(file: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / file).read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


@lru_cache(maxsize=None)
def collected(files: tuple[str, ...]) -> frozenset[str]:
    """The node ids pytest collects from ``files`` (collection only: no test runs)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *(f"tests/{f}" for f in files)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return frozenset(line.strip() for line in done.stdout.splitlines() if "::" in line)


def test_the_page_names_tests() -> None:
    assert len(references()) >= 40


@pytest.mark.parametrize("fault", FAULTS)
def test_every_fault_has_a_section_covering_every_backend(fault: str) -> None:
    found = sections()
    assert fault in found, f"no section titled {fault!r} in {DOC.name}; sections: {sorted(found)}"
    text = found[fault]
    assert ".. list-table::" in text
    for backend in BACKENDS:
        assert backend in text, f"section {fault!r} says nothing about {backend}"


def test_every_named_test_is_a_function_of_its_file() -> None:
    missing = []
    for file, name, _ in references():
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(f"tests/{file} (no such file)")
        elif name not in top_level_functions(file):
            missing.append(f"tests/{file}::{name}")
    assert missing == [], f"{DOC.name} names tests that do not exist: {missing}"


def test_every_named_parameter_id_is_collected() -> None:
    with_ids = [(file, name, id_) for file, name, id_ in references() if id_ is not None]
    assert with_ids
    nodes = collected(tuple(sorted({file for file, _, _ in with_ids})))
    missing = [f"tests/{f}::{n}[{i}]" for f, n, i in with_ids if f"tests/{f}::{n}[{i}]" not in nodes]
    assert missing == [], f"{DOC.name} names parameter ids that pytest does not collect: {missing}"


def test_rows_that_show_an_open_defect_name_a_strict_xfail() -> None:
    """A defect row's test must be marked xfail(strict=True), so fixing the defect makes it fail loudly."""
    text = DOC.read_text(encoding="utf-8")
    defects = re.findall(r"``tests/(\w+\.py)::(\w+)``\s*\(xfail, strict\)", text)
    for file, name in defects:
        tree = ast.parse((ROOT / "tests" / file).read_text(encoding="utf-8"))
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
        marks = [ast.unparse(d) for d in node.decorator_list]
        assert any("xfail" in m and "strict=True" in m for m in marks), (name, marks)
