"""examples/train_packed_lm.py runs end to end in its tiny configuration: three modes, one run;
its --help documents every option with its default."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax
import jax

import thdkit

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
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["steps"] == 3  # what docs/training.md says --tiny runs
    environment = summary["environment"]  # the versions the run used, as the bench JSON's
    assert (environment["thdkit"], environment["jax"]) == (thdkit.__version__, jax.__version__)
    assert environment["flax"] == flax.__version__
    assert {"jaxlib", "optax", "grain", "backend", "device_count", "date"} <= set(environment)
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


def test_help_gives_every_option_a_help_text_and_its_default():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        timeout=120,
    )
    listing = result.stdout.split("options:", 1)[1].split("\n\n")[0]
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", listing) if e.strip()]
    options = [e for e in entries if e.startswith("--") and not e.startswith("--help")]
    fields = re.search(r"class Config:.*?\n\n\n", SCRIPT.read_text(), re.S)[0]
    names = re.findall(r"^    (\w+): ", fields, re.M)
    assert len(options) == len(names) + 1  # every field of Config, and --tiny
    for entry in options:
        assert re.search(r"\(default: [^)]+\)$", entry), entry
    flags = {entry.split()[0] for entry in options}
    assert {"--mode", "--seq-len", "--max-segments-per-seq", "--batch-size", "--tiny"} <= flags
    # The CLI's spellings of the same ideas (thdkit bench: --seq-len, --batch-size, --heads ...).
    assert not flags & {"--modes", "--max-segments", "--batch"}
