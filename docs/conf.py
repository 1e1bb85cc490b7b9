"""Sphinx configuration of thdkit's documentation site.

The start page is README.md (included by index.md), the guides are docs/*.md (MyST), and the API
reference is generated at build time from the public modules' ``__all__``: one page per module,
one entry per public name. A name that two modules export is documented once, in the first module
of ``MODULES`` that exports it; the other page lists it with a link there.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MODULES = (
    "thdkit",
    "thdkit.kernels",
    "thdkit.context_parallel",
    "thdkit.reorder",
    "thdkit.flax",
    "thdkit.data",
)
"""The public modules, owners first: their ``__all__`` is the API."""
API_DIR = HERE / "api"
"""Where the reference pages are written (generated; not kept in git)."""

project = "thdkit"
author = "thdkit contributors"
copyright = "thdkit contributors"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "**.json", "Thumbs.db", ".DS_Store"]
html_theme = "furo"
html_title = "thdkit"
myst_heading_anchors = 3

autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # the signature shows them, with public names
napoleon_use_ivar = True  # a NamedTuple's fields are its members too: one entry each

# A reference to a thdkit name that does not resolve fails the build; the names of JAX, NumPy,
# Flax and Python's typing in signatures have no target here (no intersphinx: CI has no network).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!thdkit\b).*"),
    # Private type variables and protocols in signatures: the signature names them, there is no
    # page to link to (the reference documents public names only).
    (r"py:class", r"thdkit\._src\..*"),
]


class Entry(NamedTuple):
    """One public name of one module's reference page."""

    module: str
    name: str
    kind: str  # "function", "class", "data" or "module"
    owner: str  # the module whose page documents it


def _kind(obj: object) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return "data"


def _owner(module: str, name: str) -> str:
    obj = getattr(importlib.import_module(module), name)
    for candidate in MODULES:
        mod = importlib.import_module(candidate)
        if name in mod.__all__ and getattr(mod, name) is obj:
            return candidate
    return module


@functools.cache
def reference() -> dict[str, list[Entry]]:
    """The reference's index: for each public module, one entry per name of its ``__all__``."""
    pages = {}
    for module in MODULES:
        mod = importlib.import_module(module)
        pages[module] = [
            Entry(module, name, _kind(getattr(mod, name)), _owner(module, name))
            for name in mod.__all__
        ]
    return pages


def _data_doc(module: str, name: str) -> str:
    """The attribute docstring of a module-level constant, read where it is assigned."""
    from sphinx.pycode import ModuleAnalyzer

    obj = getattr(importlib.import_module(module), name)
    for modname, mod in sorted(sys.modules.items()):
        if not modname.startswith("thdkit") or getattr(mod, name, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except Exception:
            continue
        if ("", name) in docs:
            return "\n".join(docs["", name]).strip()
    return ""


def _indent(text: str, prefix: str = "   ") -> str:
    return "\n".join(prefix + line if line.strip() else "" for line in text.splitlines())


def _page(module: str, entries: list[Entry], missing: list[str]) -> str:
    title = f"``{module}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {module}", ""]
    lines += [
        ", ".join(f":py:obj:`~{entry.owner}.{entry.name}`" for entry in entries) + ".",
        "",
    ]
    elsewhere = [entry for entry in entries if entry.owner != module]
    if elsewhere:
        lines += ["Also exported here, and documented once, where they are owned:", ""]
        for entry in elsewhere:
            role = {"class": "class", "function": "func", "module": "mod"}.get(entry.kind, "data")
            lines.append(f"- :py:{role}:`{entry.owner}.{entry.name}`")
        lines.append("")
    mod = importlib.import_module(module)
    for entry in entries:
        if entry.owner != module:
            continue
        dotted = f"{module}.{entry.name}"
        obj = getattr(mod, entry.name)
        if entry.kind == "module":
            lines += [f"- ``{entry.name}``: the module :py:mod:`{obj.__name__}`", ""]
        elif entry.kind == "data":
            doc = _data_doc(module, entry.name)
            if not doc:
                missing.append(dotted)
            lines += [f".. py:data:: {entry.name}"]
            value = repr(obj)
            if len(value) <= 60 and "<" not in value:
                lines.append(f"   :value: {value}")
            lines += ["", _indent(doc), ""]
        else:
            if not (obj.__doc__ or "").strip():
                missing.append(dotted)
            directive = "autoclass" if entry.kind == "class" else "autofunction"
            lines.append(f".. {directive}:: {dotted}")
            if entry.kind == "class":
                lines.append("   :members:")
                if issubclass(obj, __import__("enum").Enum):
                    lines.append("   :undoc-members:")
            lines.append("")
    return "\n".join(lines)


def write_reference(directory: Path = API_DIR) -> list[str]:
    """Writes <directory>/<module>.rst and its index.rst; returns the names without a doc."""
    directory.mkdir(exist_ok=True)
    missing: list[str] = []
    pages = reference()
    files = {f"{module}.rst": _page(module, entries, missing) for module, entries in pages.items()}
    toc = "\n".join(f"   {module}" for module in pages)
    files["index.rst"] = (
        "API reference\n=============\n\n"
        "What the public modules export (their ``__all__``) is thdkit's whole API.\n\n"
        f".. toctree::\n   :maxdepth: 1\n\n{toc}\n"
    )
    for name, text in files.items():
        path = directory / name
        if not path.exists() or path.read_text("utf-8") != text:
            path.write_text(text, "utf-8")
    for stale in {p.name for p in directory.glob("*.rst")} - set(files):
        (directory / stale).unlink()
    return missing


_STAR = re.compile(r"(?<=[\[ ,('\"])\*(?=\w)")
_LITERAL = re.compile(r"(``.*?``|`[^`]*`)")


def _shapes(app: object, what: str, name: str, obj: object, options: object, lines: list) -> None:
    """Keeps the docstrings' shape notation (``int32[*B, T]``) from reading as emphasis."""
    in_doctest = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        in_doctest = stripped.startswith(">>>") or (in_doctest and bool(stripped))
        if in_doctest or "*" not in line:
            continue
        parts = _LITERAL.split(line)
        lines[i] = "".join(p if k % 2 else _STAR.sub(r"\\*", p) for k, p in enumerate(parts))


@functools.cache
def _aliases() -> dict[str, str]:
    """``module.name`` -> the dotted name it is documented under, for re-exported names."""
    return {
        f"{entry.module}.{entry.name}": f"{entry.owner}.{entry.name}"
        for entries in reference().values()
        for entry in entries
        if entry.owner != entry.module
    }


def _missing_reference(app, env, node, contnode):
    """Resolves a reference to a re-exported name (``thdkit.kernels.attention``) to its entry."""
    if node.get("refdomain") != "py":
        return None
    target = _aliases().get(node.get("reftarget", ""))
    if target is None:
        return None
    node = node.deepcopy()
    node["reftarget"] = target
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], target, node, contnode
    )


_DOTTED = re.compile(r"(thdkit(?:\.\w+)+)(?:\(.*\))?")


def _link_names(app, doctree, docname):
    """Links the guides' inline code that names a public object (`thdkit.attention`,
    `thdkit.Segments.from_ids(...)`) to its reference entry; the Markdown stays plain."""
    from docutils import nodes

    if docname.startswith("api/"):
        return
    objects = app.env.get_domain("py").objects
    aliases = _aliases()
    for literal in list(doctree.findall(nodes.literal)):
        if isinstance(literal.parent, nodes.reference) or "xref" in literal.get("classes", []):
            continue
        match = _DOTTED.fullmatch(literal.astext())
        if match is None:
            continue
        target = aliases.get(match.group(1), match.group(1))
        if target not in objects:
            continue
        entry = objects[target]
        uri = app.builder.get_relative_uri(docname, entry.docname) + "#" + entry.node_id
        reference = nodes.reference("", "", internal=True, refuri=uri, reftitle=target)
        literal.replace_self(reference)
        reference.append(literal)


_PRIVATE = re.compile(r"\bthdkit\._src\.(?:\w+\.)*(\w+)")


@functools.cache
def _public_names() -> dict[str, str]:
    """The private dotted name of each public class -> its public name."""
    names = {}
    for entries in reference().values():
        for entry in entries:
            obj = getattr(importlib.import_module(entry.owner), entry.name)
            if entry.kind == "class" and entry.owner == entry.module:
                names[f"{obj.__module__}.{obj.__qualname__}"] = f"{entry.owner}.{entry.name}"
    return names


def _signature(app, what, name, obj, options, signature, return_annotation):
    """Signatures name public classes by their public names, private ones by their own name."""
    names = _public_names()

    def public(text: str | None) -> str | None:
        if not text:
            return text
        text = text.replace("jaxlib._jax.Array", "jax.Array")
        return _PRIVATE.sub(lambda m: names.get(m.group(0), m.group(1)), text)

    return public(signature), public(return_annotation)


def _builder_inited(app: object) -> None:
    from sphinx.util import logging

    for dotted in write_reference():
        logging.getLogger(__name__).warning("public name %s has no docstring", dotted)


def setup(app: object) -> dict[str, bool]:
    app.connect("builder-inited", _builder_inited)
    app.connect("autodoc-process-docstring", _shapes)
    app.connect("missing-reference", _missing_reference)
    app.connect("doctree-resolved", _link_names)
    app.connect("autodoc-process-signature", _signature)
    return {"parallel_read_safe": True}
