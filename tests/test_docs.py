"""The code in README.md and docs/attention.md runs and shows what the text says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _run_python_blocks(path: Path) -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
    assert blocks, f"no python block in {path}"
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)
    return namespace


def test_readme_examples():
    namespace = _run_python_blocks(ROOT / "README.md")
    meta = namespace["meta"]
    np.testing.assert_array_equal(meta.q_seqlens, [[3, 2, 1, 0]])
    np.testing.assert_array_equal(meta.q_offsets, [[0, 3, 7, -1, -1]])
    np.testing.assert_array_equal(namespace["flat"].cu_seqlens_q, [0, 3, 5, 6, 6])
    assert namespace["out"].shape == (1, 8, 2, 16)


def test_attention_doc_example():
    namespace = _run_python_blocks(ROOT / "docs" / "attention.md")
    assert namespace["out"].shape == (1, 8, 2, 16)
