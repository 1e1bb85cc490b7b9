"""Every dotted name and every file path the docs and the README name resolves; none is
private (thdkit's core, ``thdkit._src``); the README's table of public modules lists what each
exports."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import thdkit
import thdkit.kernels

from .test_structure import SURFACE

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_NAME = re.compile(r"(?<![\w/.-])(thdkit(?:\.[A-Za-z_]\w*)+)")
_PATH = re.compile(r"(?<![\w/.-])((?:thdkit|tests|examples|scripts|docs)/[\w/.-]*\w)")
_PRIVATE = re.compile(r"[\w./-]*[./]_src\b[\w./-]*")
"""A dotted name or a path through a ``_src`` folder; only JAX's own (``jax._src...``) may be
named, as the library thdkit calls into."""
PUBLIC_MODULES = list(SURFACE)
"""The modules whose ``__all__`` is the API (README.md, "The public modules")."""


def _names() -> list[tuple[str, str]]:
    found = set()
    for doc in DOCS:
        for match in _NAME.finditer(doc.read_text(encoding="utf-8")):
            found.add((doc.name, match.group(1)))
    return sorted(found)


def _paths() -> list[tuple[str, str]]:
    found = set()
    for doc in DOCS:
        for match in _PATH.finditer(doc.read_text(encoding="utf-8")):
            found.add((doc.name, match.group(1).rstrip(".")))
    return sorted(found)


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize(("doc", "dotted"), _names(), ids=lambda x: x)
def test_every_named_object_exists(doc: str, dotted: str) -> None:
    pytest.importorskip("flax") if dotted.startswith(("thdkit.flax", "thdkit.data")) else None
    pytest.importorskip("typer") if dotted.startswith(("thdkit.bench", "thdkit.cli")) else None
    try:
        _resolve(dotted)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{doc} names {dotted}, which does not resolve: {error}")


@pytest.mark.parametrize(("doc", "path"), _paths(), ids=lambda x: x)
def test_every_named_file_exists(doc: str, path: str) -> None:
    assert (ROOT / path).exists(), f"{doc} names {path}, which does not exist"


def test_the_subpackage_does_not_shadow_the_function() -> None:
    assert callable(thdkit.attention) and thdkit.attention is thdkit.kernels.attention
    assert thdkit.kernels.is_representable is thdkit.is_representable


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_doc_names_the_private_core(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    named = [m.group(0) for m in _PRIVATE.finditer(text) if not m.group(0).startswith("jax._src.")]
    assert not named, f"{doc.name} names private modules or files: {sorted(set(named))}"


def test_the_private_core_pattern_finds_names_and_paths() -> None:
    text = "`thdkit._src.reorder.striped`, thdkit/_src/host.py, from ._src import x, jax._src.core"
    found = [m.group(0) for m in _PRIVATE.finditer(text)]
    assert found == ["thdkit._src.reorder.striped", "thdkit/_src/host.py", "._src", "jax._src.core"]


def _public_modules_table() -> list[tuple[str, str]]:
    """(module, exports cell) of each row of the README's table of public modules."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## The public modules", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines()]
    return [(cells[0].strip(), cells[1]) for cells in rows if len(cells) == 2 and "`" in cells[0]]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_the_readme_lists_every_export_of_each_public_module(module: str) -> None:
    needs = {"thdkit.flax": "flax", "thdkit.data": "grain"}
    pytest.importorskip(needs[module]) if module in needs else None
    cells = dict(_public_modules_table())
    assert f"`{module}`" in cells, f"README.md's table of public modules has no row {module}"
    listed = set(re.findall(r"`(\w+)`", cells[f"`{module}`"]))
    exported = set(importlib.import_module(module).__all__)
    assert exported <= listed, f"{module} exports {sorted(exported - listed)}, not in README.md"
    unknown = listed - exported - set(thdkit.__all__)
    assert not unknown, f"README.md lists {sorted(unknown)} under {module}, which exports none"
