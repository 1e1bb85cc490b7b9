"""Every table of docs/attention.md listing implementations, and of docs/context-parallel.md
listing strategies, names exactly what the registries hold, in registration order."""

from __future__ import annotations

import re
from pathlib import Path

from thdkit import context_parallel, kernels

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(the heading above, header cells, body rows) of each markdown table of ``text``."""
    found, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        is_table = line.startswith("|") and i + 1 < len(lines)
        if is_table and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            header = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            found.append((heading, header, rows))
            continue
        i += 1
    return found


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _name(cell: str) -> str:
    """A table cell's name: ``"cudnn"`` with its backticks and quotes taken off."""
    return cell.strip("`").strip('"')


def _in_order(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def test_the_implementations_table_equals_the_kernel_registry() -> None:
    tables = [
        [_name(row[0]) for row in rows]
        for heading, header, rows in _tables((DOCS / "attention.md").read_text())
        if "implementation" in heading.lower() and header[0] in ("", "implementation")
    ]
    assert tables, "docs/attention.md has no table of implementations"
    for listed in tables:
        assert tuple(listed) == kernels.names()


def test_every_strategy_table_equals_the_strategy_registry() -> None:
    tables = [
        _in_order([_name(row[header.index("strategy")]) for row in rows])
        for _, header, rows in _tables((DOCS / "context-parallel.md").read_text())
        if "strategy" in header
    ]
    assert len(tables) >= 2, "docs/context-parallel.md lost its strategy tables"
    for listed in tables:
        assert listed == context_parallel.names()


def test_the_parser_reads_a_table_under_its_heading() -> None:
    text = '## Choosing\n\n| | a |\n|---|---|\n| `"x"` | 1 |\n| `y` | 2 |\n\nprose | no\n'
    assert _tables(text) == [("Choosing", ["", "a"], [['`"x"`', "1"], ["`y`", "2"]])]
    assert [_name(row[0]) for row in _tables(text)[0][2]] == ["x", "y"]
