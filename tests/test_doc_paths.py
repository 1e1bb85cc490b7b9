"""Every dotted name and every file path the docs and the README name resolves."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_NAME = re.compile(r"(?<![\w/.-])(thdkit(?:\.[A-Za-z_]\w*)+)")
_PATH = re.compile(r"(?<![\w/.-])((?:thdkit|tests|examples|scripts|docs)/[\w/.-]*\w)")


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
    import thdkit

    assert callable(thdkit.attention) and thdkit.attention.__module__ == "thdkit._src.doors.keywords"
    assert thdkit.kernels.is_representable is thdkit.is_representable
