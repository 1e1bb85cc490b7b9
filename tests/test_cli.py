"""Tests of the ``thdkit`` command line on tiny sizes (no timing assertions)."""

from __future__ import annotations

import json

import jax
import pytest
import typer
from typer.testing import CliRunner

from thdkit import __version__
from thdkit.cli import app, parse_size

RECORD_KEYS = {
    "method",
    "mask_type",
    "layout",
    "batch",
    "seq_len",
    "max_segments",
    "arg_bytes",
    "output_bytes",
    "temp_bytes",
    "flops",
    "bytes_accessed",
    "latency_ms",
    "skip_reason",
}
ENVIRONMENT_KEYS = {"jax", "jaxlib", "backend", "device_kind", "cpu_count", "date"}
TINY = [
    "bench",
    "--seq-lens",
    "64,128",
    "--max-segments",
    "4",
    "--mask-types",
    "padding",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--time-per-method",
    "0.01",
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _invoke(runner: CliRunner, *args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


def test_version(runner):
    result = _invoke(runner, "--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"thdkit {__version__}"


def test_bench_is_a_group_for_later_subcommands():
    command = typer.main.get_command(app)
    bench = command.commands["bench"]
    assert isinstance(bench, typer.core.TyperGroup)
    assert bench.invoke_without_command


def test_bench_writes_tables_json_and_plot(runner, tmp_path):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = _invoke(runner, *TINY, "--json", str(json_path), "--plot", str(png_path))
    assert result.exit_code == 0, result.output
    for title in ("MEMORY SUMMARY", "WORK SUMMARY", "LATENCY SUMMARY", "GROWTH OVER T"):
        assert title in result.output
    assert f"backend {jax.default_backend()}" in result.output

    document = json.loads(json_path.read_text())
    assert set(document["environment"]) >= ENVIRONMENT_KEYS
    assert document["environment"]["backend"] == jax.default_backend()
    records = document["records"]
    assert len(records) == 2 * 4  # two T, three methods + floor
    assert {r["method"] for r in records} == {"linear", "one_hot", "dense", "floor"}
    for record in records:
        assert set(record) >= RECORD_KEYS
        assert record["skip_reason"] is None
        assert set(record["latency_ms"]) >= {"median", "min", "max"}
        assert record["layout"] == "self" and record["batch"] == 1
    assert png_path.read_bytes().startswith(b"\x89PNG")


def test_memory_limit_forces_not_run(runner, tmp_path):
    json_path = tmp_path / "bench.json"
    result = _invoke(
        runner, *TINY, "--seq-lens", "64", "--memory-limit-bytes", "1", "--json", str(json_path)
    )
    assert result.exit_code == 0, result.output
    records = json.loads(json_path.read_text())["records"]
    assert {r["method"] for r in records} == {"linear", "one_hot", "dense", "floor"}
    for record in records:
        assert record["latency_ms"] is None
        assert record["skip_reason"].startswith("not run: needs ")
        assert record["temp_bytes"] is not None  # the plan is still reported
    assert "not run: needs" in result.output


def test_compile_limit_skips_compiling(runner, tmp_path):
    json_path = tmp_path / "bench.json"
    result = _invoke(
        runner,
        *TINY,
        "--seq-lens",
        "64",
        "--methods",
        "dense",
        "--compile-limit-bytes",
        "1k",
        "--json",
        str(json_path),
    )
    assert result.exit_code == 0, result.output
    dense, floor = json.loads(json_path.read_text())["records"]
    assert dense["skip_reason"].startswith("not compiled: needs ~4.0 KiB")
    assert dense["temp_bytes"] is None and dense["compile_s"] is None
    assert floor["method"] == "floor" and floor["latency_ms"] is not None


@pytest.mark.parametrize("layout", ["cross", "ring"])
def test_other_layouts(runner, tmp_path, layout):
    json_path = tmp_path / "bench.json"
    result = _invoke(
        runner,
        *TINY,
        "--seq-lens",
        "64",
        "--methods",
        "linear,one_hot",
        "--layout",
        layout,
        "--json",
        str(json_path),
    )
    assert result.exit_code == 0, result.output
    records = json.loads(json_path.read_text())["records"]
    assert {r["layout"] for r in records} == {layout}
    assert all(r["matches_linear"] for r in records if r["method"] != "floor")
    assert all((r["ring_step"] is not None) == (layout == "ring") for r in records)


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "--quick", "--full"],
        ["bench", "--methods", "fast"],
        ["bench", "--seq-lens", "lots"],
        ["bench", "--layout", "diagonal"],
    ],
)
def test_bad_options_fail_cleanly(runner, args):
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output


def test_parse_size():
    assert parse_size("128k") == 131072
    assert parse_size("1M") == 2**20
    assert parse_size("16GiB") == 16 * 2**30
    with pytest.raises(typer.BadParameter):
        parse_size("-3")


def test_bench_ring_subcommand(runner, tmp_path):
    # conftest gives 8 simulated CPU devices, so the latency path runs on a mesh of cp=4.
    json_path = tmp_path / "ring.json"
    result = runner.invoke(
        app,
        [
            *("bench", "ring", "--seq-len", "256", "--segments", "1,4", "--stripe-sizes", "1"),
            *("--json", str(json_path)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "RING SUMMARY" in result.output
    document = json.loads(json_path.read_text())
    assert document["benchmark"] == "ring" and document["environment"]["backend"] == "cpu"
    reorders = {(r["segments"], r["reorder"]) for r in document["records"]}
    assert reorders == {(s, r) for s in (1, 4) for r in ("none", "striped(1)", "dual_chunk_swap")}
    one_doc_striped = next(
        r for r in document["records"] if r["segments"] == 1 and r["reorder"] == "striped(1)"
    )
    assert one_doc_striped["imbalance"] < 1.05
    assert all(r["latency_ms"] is not None for r in document["records"])


def test_bench_attention_subcommand(runner, tmp_path):
    json_path = tmp_path / "attention.json"
    result = runner.invoke(
        app,
        [
            *("bench", "attention", "--seq-lens", "256", "--segments", "4", "--heads", "1"),
            *("--head-dim", "8", "--repeats", "1", "--json", str(json_path)),
        ],
    )
    assert result.exit_code == 0, result.output
    records = json.loads(json_path.read_text())["records"]
    assert {(r["implementation"], r["pass"]) for r in records} == {
        (impl, p) for impl in ("reference", "blockwise") for p in ("fwd", "fwd+bwd")
    }
    assert all(r["status"] == "ran" for r in records)
    with_tiles = [r for r in records if r["implementation"] == "blockwise"]
    assert all(0 < r["tiles_visited_fraction"] <= 1 for r in with_tiles)


def test_bench_subcommand_bad_options_fail_cleanly(runner):
    for args in (["bench", "ring", "--seq-len", "100"], ["bench", "attention", "--segments", "0"]):
        result = runner.invoke(app, args)
        assert result.exit_code != 0
        assert "Traceback" not in result.output
