"""Every ```python block of README.md and docs/*.md runs as written, in order, in one namespace
per file, and shows what the text says.

One test per file. A block fenced ```python gpu needs a GPU: it runs only where JAX's backend is
one, and the blocks after it must not depend on it. A deprecated spelling called from a block
(a ``DeprecationWarning`` pointing at the block's own line) fails it: the docs show the current
names. docs/conventions.md and docs/context-parallel.md have their runners next to the code they
document (``ELSEWHERE``); every other file with a python block runs here, and a file with python
blocks and no runner fails.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

import thdkit
import thdkit.kernels

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)

ELSEWHERE = {
    "conventions.md": "tests/test_maxtext.py",  # test_conventions_doc_runs
    "context-parallel.md": "tests/test_ring.py",  # test_docs_example_runs
}
"""Docs whose blocks another test file runs (one runner per doc)."""


def _blocks(path: Path) -> list[tuple[str, str]]:
    """The python blocks of a file: (the fence's words after ``python``, the code)."""
    return [(info.strip(), code) for info, code in _FENCE.findall(path.read_text("utf-8"))]


def _run_python_blocks(path: Path) -> dict[str, Any]:
    blocks = _blocks(path)
    assert blocks, f"no python block in {path}"
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    with warnings.catch_warnings():
        # Warnings are attributed to the module of the line they point at: the blocks' own.
        warnings.filterwarnings("error", category=DeprecationWarning, module="docs_example")
        for info, code in blocks:
            assert info in ("", "gpu"), f"{path.name}: unknown fence ```python {info}"
            if info == "gpu" and jax.default_backend() != "gpu":
                continue
            exec(compile(code, str(path), "exec"), namespace)
    return namespace


def _readme(namespace: dict[str, Any]) -> None:
    meta = namespace["meta"]
    np.testing.assert_array_equal(meta.q_seqlens, [[3, 2, 1, 0]])
    np.testing.assert_array_equal(meta.q_offsets, [[0, 3, 7, -1, -1]])
    np.testing.assert_array_equal(namespace["flat"].cu_seqlens_q, [0, 3, 5, 6, 6])
    assert namespace["out"].shape == (1, 8, 2, 16)


def _attention(namespace: dict[str, Any]) -> None:
    assert namespace["out"].shape == (1, 8, 2, 16)
    # "Adding an implementation": the class written there ran through both entry points (its
    # block compares them with the reference), under the protocol's current method names, and
    # left the registry as it found it.
    written = namespace["PlainSoftmax"]
    assert issubclass(written, thdkit.kernels.Implementation)
    assert "check_segments" in vars(written)
    assert namespace["mine"].shape == namespace["mine_nn"].shape == (1, 8, 4, 16)
    assert "plain_softmax" not in thdkit.kernels.names()


def _training(namespace: dict[str, Any]) -> None:
    batch, striped = namespace["batch"], namespace["striped_batch"]
    assert namespace["y"].shape == namespace["y_cp"].shape == (2, 256, 128)
    assert int(batch["inputs_segment_ids"].max()) > 1  # several documents a row
    # The striped batch's Segments are the plain batch's, reordered with the tokens.
    np.testing.assert_array_equal(striped["segments"].ids, striped["inputs_segment_ids"])
    assert namespace["err"].get() is not None


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "README.md": _readme,
    "attention.md": _attention,
    "training.md": _training,
}
"""What each file's blocks must show, beyond running."""


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_doc_blocks_run_in_order(name: str) -> None:
    path = ROOT / name if name == "README.md" else ROOT / "docs" / name
    CHECKS[name](_run_python_blocks(path))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_doc_with_python_blocks_has_one_runner(path: Path) -> None:
    if not _blocks(path):
        assert path.name not in CHECKS, f"{path.name} has no python block left to run"
        return
    assert (path.name in CHECKS) != (path.name in ELSEWHERE), f"{path.name}: one runner"
    if path.name in ELSEWHERE:
        runner = (ROOT / ELSEWHERE[path.name]).read_text("utf-8")
        assert path.name in runner, f"{ELSEWHERE[path.name]} does not run {path.name}"


def test_a_block_calling_a_deprecated_spelling_fails(tmp_path: Path) -> None:
    doc = tmp_path / "old.md"
    doc.write_text(
        "```python\nimport warnings\n\n\ndef old():\n"
        "    warnings.warn('old is deprecated', DeprecationWarning, stacklevel=2)\n```\n\n"
        "```python\nold()\n```\n",
        "utf-8",
    )
    with pytest.raises(DeprecationWarning, match="old is deprecated"):
        _run_python_blocks(doc)


@pytest.mark.parametrize(
    ("title", "supports"),
    [
        ("Soft-capped logits", lambda impl: "logits_soft_cap" in impl.features),
        ("Attention sinks", lambda impl: impl.returns_lse),
        ("Prefix-LM masks", lambda impl: "prefix" in impl.features),
    ],
)
def test_semantics_names_the_implementations_of_each_feature(title, supports):
    """docs/semantics.md's "Implementations:" line of each feature lists the built-ins that
    support it (before the ";") and those refused it (after), as the registry says today."""
    text = (ROOT / "docs" / "semantics.md").read_text("utf-8")
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    supported, refused = section.split("\nImplementations: ", 1)[1].split(";", 1)
    named = lambda words: set(re.findall(r'`"(\w+)"`', words))  # noqa: E731
    built_in = {"cudnn", "blockwise", "pallas", "reference"}
    assert built_in <= set(thdkit.kernels.names())
    want = {name for name in built_in if supports(thdkit.kernels.get(name))}
    assert named(supported) == want
    assert named(refused.split("(", 1)[0]) == built_in - want
