"""The documentation site (docs/, Sphinx): its API reference documents exactly the pinned public
surface, each name once; every guide is in the navigation; the site builds with warnings as
errors (where the extra ``[docs]`` is installed: CI builds it in its Python 3.11 leg)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from tests.test_structure import SURFACE

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _conf() -> ModuleType:
    """docs/conf.py as a module (it imports no Sphinx at module level)."""
    pytest.importorskip("flax")  # the reference covers thdkit.flax and thdkit.data
    pytest.importorskip("grain")
    spec = importlib.util.spec_from_file_location("thdkit_docs_conf", DOCS / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_documents_the_pinned_surface() -> None:
    conf = _conf()
    pages = conf.reference()
    assert list(pages) == list(SURFACE), "one reference page per public module"
    for module, entries in pages.items():
        assert sorted(entry.name for entry in entries) == SURFACE[module], module


def test_each_public_object_is_documented_once() -> None:
    conf = _conf()
    owned: dict[str, list[str]] = {}
    for module, entries in conf.reference().items():
        for entry in entries:
            obj = getattr(importlib.import_module(module), entry.name)
            owner = getattr(importlib.import_module(entry.owner), entry.name)
            assert owner is obj, f"{module}.{entry.name} documented as another object"
            if entry.owner == module:
                owned.setdefault(f"{entry.name}:{id(obj)}", []).append(module)
    documented_twice = {key: names for key, names in owned.items() if len(names) > 1}
    assert not documented_twice, f"documented on two pages: {documented_twice}"
    # A name two modules export (thdkit.attention is thdkit.kernels.attention) has one owner.
    kernels = {entry.name: entry for entry in conf.reference()["thdkit.kernels"]}
    assert kernels["attention"].owner == "thdkit"
    assert kernels["register"].owner == "thdkit.kernels"


def test_the_generated_pages_have_one_entry_per_name(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    conf = _conf()
    assert conf.write_reference(tmp_path) == [], "a public name has no docstring"
    for module, entries in conf.reference().items():
        page = (tmp_path / f"{module}.rst").read_text("utf-8")
        for entry in entries:
            if entry.owner != module:
                assert f"`{entry.owner}.{entry.name}`" in page, f"{module}: no link {entry.name}"
                continue
            directive = {
                "function": f".. autofunction:: {module}.{entry.name}\n",
                "class": f".. autoclass:: {module}.{entry.name}\n",
                "data": f".. py:data:: {entry.name}\n",
                "module": f"- ``{entry.name}``: the module",
            }[entry.kind]
            assert page.count(directive) == 1, f"{module}.{entry.name}: {directive!r}"
    index = (tmp_path / "index.rst").read_text("utf-8")
    assert [line.strip() for line in index.splitlines()[-len(SURFACE) :]] == list(SURFACE)


def _toctree_entries() -> set[str]:
    text = (DOCS / "index.md").read_text("utf-8")
    entries = set()
    for body in re.findall(r"^```\{toctree\}\n(.*?)^```", text, re.S | re.M):
        entries |= {line.strip() for line in body.splitlines() if line.strip()[:1] not in ":"}
    return entries


def test_every_guide_is_in_a_toctree() -> None:
    guides = {path.stem for path in DOCS.glob("*.md")} - {"index"}
    entries = _toctree_entries()
    assert guides, "no guide found"
    assert guides <= entries, f"guides missing from docs/index.md: {sorted(guides - entries)}"
    assert "api/index" in entries
    for entry in entries - {"api/index"}:
        assert (DOCS / f"{entry}.md").exists(), f"docs/index.md lists {entry}, which is missing"


def test_the_start_page_is_the_readme() -> None:
    text = (DOCS / "index.md").read_text("utf-8")
    assert text.startswith("```{include} ../README.md\n")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")
def test_the_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    for name in ("sphinx", "myst_parser", "furo"):
        pytest.importorskip(name)
    _conf()
    from sphinx.cmd.build import build_main

    out = tmp_path / "html"
    status = build_main(["-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)])
    assert status == 0, "the site's build warned or failed (run it to see why)"
    assert (out / "api" / "thdkit.html").exists()
    search = (out / "searchindex.js").read_text("utf-8")
    assert "seqlens_and_offsets" in search
