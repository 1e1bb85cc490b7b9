"""examples/train_packed_lm.py runs end to end in its tiny configuration, in all three modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_packed_lm.py"


def _run(out: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--steps", "3", "--out", str(out), *args],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )


def test_tiny_runs_write_the_summary_and_the_figure(tmp_path):
    _run(tmp_path, "--packing", "none")
    _run(tmp_path, "--packing", "grain")
    _run(tmp_path, "--packing", "grain", "--cp", "4")
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = summary["runs"]
    assert set(runs) == {"none", "grain", "grain-cp4"}
    for run in runs.values():
        assert [s["step"] for s in run["steps"]] == [1, 2, 3]
        assert all(0 < s["loss"] < 10 for s in run["steps"])
        assert 0 <= run["padding_share"] < 1
    # One document per row pads more than packing the same documents.
    assert runs["none"]["padding_share"] > runs["grain"]["padding_share"]
    # Packing changes nothing but speed: each document's loss is its loss alone in a row.
    check = runs["grain"]["per_document_check"]
    assert check["documents"] >= 2 and check["max_relative_difference"] < 1e-5
    comparisons = summary["comparisons"]
    assert comparisons["grain-cp4_vs_cp1"]["steps"] == 3
    assert comparisons["grain-cp4_vs_cp1"]["max_relative_difference"] < 1e-4
    assert comparisons["packed_vs_padded"]["useful_tokens_per_s_ratio"] > 0
    assert (tmp_path / "loss.png").stat().st_size > 10_000
