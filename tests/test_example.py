"""examples/train_packed_lm.py runs end to end in its tiny configuration: three modes, one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_packed_lm.py"


def test_tiny_run_writes_the_summary_and_the_figure(tmp_path):
    # One process: JAX starts once, the initial parameters are built once. The tiny run is
    # mostly compilation, so XLA:CPU compiles for speed of compilation: no LLVM optimisation and,
    # on jax 0.10, the older fusion emitters (a flag the XLA of jax 0.12 no longer has; XLA names
    # an unknown flag and stops).
    flags = "--xla_backend_optimization_level=0"
    if jax.__version_info__ < (0, 11):
        flags += " --xla_cpu_use_fusion_emitters=false"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": flags}
    subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--steps", "3", "--out", str(tmp_path)],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = summary["runs"]
    assert set(runs) == {"none", "grain", "grain-cp4"}
    for run in runs.values():
        assert [s["step"] for s in run["steps"]] == [1, 2, 3]
        assert all(0 < s["loss"] < 10 for s in run["steps"])
        assert 0 <= run["padding_share"] < 1
        assert [e["step"] for e in run["evals"]] == [0, 2, 3]
    # One document per row pads more than packing the same documents.
    assert runs["none"]["padding_share"] > runs["grain"]["padding_share"]
    # Every mode evaluates the same held-out documents: equal losses from equal parameters.
    initial = [run["evals"][0]["loss"] for run in runs.values()]
    assert max(initial) - min(initial) < 1e-5 * initial[0]
    # Packing changes nothing but speed: each document's loss is its loss alone in a row.
    check = runs["grain"]["per_document_check"]
    assert check["documents"] >= 2 and check["max_relative_difference"] < 1e-5
    comparisons = summary["comparisons"]
    assert comparisons["grain-cp4_vs_cp1"]["steps"] == 3
    assert comparisons["grain-cp4_vs_cp1"]["max_relative_difference"] < 1e-4
    assert comparisons["packed_vs_padded"]["useful_tokens_per_s_ratio"] > 0
    assert comparisons["packed_vs_padded"]["padded_steps"] == 3
    assert (tmp_path / "loss.png").stat().st_size > 10_000
