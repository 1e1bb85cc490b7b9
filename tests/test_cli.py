"""Tests of the ``thdkit`` command line on tiny sizes (no timing assertions)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import jax
import pytest
import typer
from typer.testing import CliRunner

from thdkit import __version__
from thdkit.bench.commands import app

RECORD_KEYS = {
    "method", "mask_type", "layout", "batch", "seq_len", "max_segments", "arg_bytes",
    "output_bytes", "temp_bytes", "flops", "bytes_accessed", "latency_ms", "skip_reason",
}  # fmt: skip
ENVIRONMENT_KEYS = {
    "thdkit",
    "jax",
    "jaxlib",
    "backend",
    "device_kind",
    "cpu_count",
    "date",
    "peers",
}
DOCUMENT_KEYS = ["benchmark", "config", "environment", "summary", "records"]
LATENCY_KEYS = {"median", "min", "max", "samples"}
TINY = [
    *("bench", "--seq-len", "64,128", "--segments", "4", "--mask-type", "padding"),
    *("--warmup", "1", "--repeats", "2", "--time-per-program", "0.01"),
]
TINY_RING = ["bench", "ring", "--seq-len", "256", "--segments", "1,4", "--stripe-size", "1"]
TINY_ATTENTION = [
    *("bench", "attention", "--seq-len", "256", "--segments", "4", "--heads", "1"),
    *("--head-dim", "8", "--repeats", "1", "--implementation", "reference,blockwise"),
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _invoke(runner: CliRunner, *args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _document(path) -> dict:
    document = json.loads(path.read_text())
    assert list(document) == DOCUMENT_KEYS
    assert set(document["environment"]) >= ENVIRONMENT_KEYS
    environment = document["environment"]
    assert environment["backend"] == jax.default_backend()
    assert (environment["thdkit"], environment["jax"]) == (__version__, jax.__version__)
    assert set(environment["peers"]) <= {"ejkernel", "tokamax"}  # the peers that ran
    for record in document["records"]:
        assert "skip_reason" in record
        assert record["latency_ms"] is None or set(record["latency_ms"]) == LATENCY_KEYS
    return document


def test_version(runner):
    assert _invoke(runner, "--version").output.strip() == f"thdkit {__version__}"


def test_bench_is_a_group_for_later_subcommands():
    bench = typer.main.get_command(app).commands["bench"]
    assert isinstance(bench, typer.core.TyperGroup) and bench.invoke_without_command
    assert set(bench.commands) == {"attention", "compile", "cp", "plan", "ring"}


def test_bench_writes_tables_json_and_plot(runner, tmp_path):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = _invoke(runner, *TINY, "--json", str(json_path), "--plot", str(png_path))
    for title in ("MEMORY: scratch bytes", "WORK: bytes", "LATENCY: median ms", "GROWTH OVER T"):
        assert title in result.output
    assert f"backend {jax.default_backend()}" in result.output
    document = _document(json_path)
    assert document["benchmark"] == "metadata"
    assert document["config"]["seq_lens"] == [64, 128] and document["config"]["repeats"] == 2
    assert {row["method"] for row in document["summary"]["growth"]} >= {"linear", "dense"}
    records = document["records"]
    assert len(records) == 2 * 4  # two T, three methods + floor
    assert {r["method"] for r in records} == {"linear", "one_hot", "dense", "floor"}
    for record in records:
        assert set(record) >= RECORD_KEYS
        assert record["skip_reason"] is None and record["latency_ms"]["samples"] == 2
        assert record["layout"] == "self" and record["batch"] == 1
    assert png_path.read_bytes().startswith(b"\x89PNG")


def test_bench_reads_well_at_80_columns_and_ends_with_the_result(runner):
    result = runner.invoke(app, TINY, env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "…" not in result.output, result.output  # no cell cut short
    assert max(len(line) for line in lines) <= 80, result.output
    assert "cpu (cpu)" not in result.output  # the device named once
    for legend in ("scratch: XLA temp bytes", "floor: ", "(Nx): N times linear's", "k: least"):
        assert legend in result.output, legend
    pattern = r"linear: \d+\.\d B scratch/token at T=128; one_hot [\d.,]+x, dense [\d.,]+x more"
    assert re.fullmatch(pattern, lines[-1]), lines[-1]


def test_memory_limit_forces_not_run(runner, tmp_path):
    json_path = tmp_path / "bench.json"
    result = _invoke(
        runner, *TINY, "--seq-len", "64", "--memory-limit-bytes", "1", "--json", str(json_path)
    )
    records = _document(json_path)["records"]
    assert {r["method"] for r in records} == {"linear", "one_hot", "dense", "floor"}
    for record in records:
        assert record["latency_ms"] is None
        assert record["skip_reason"].startswith("not run: needs ")
        assert record["temp_bytes"] is not None  # the plan is still reported
    assert "not run: needs" in result.output


def test_compile_limit_skips_compiling(runner, tmp_path):
    json_path = tmp_path / "bench.json"
    _invoke(
        runner, *TINY, "--seq-len", "64", "--method", "dense", "--compile-limit-bytes", "1k",
        "--json", str(json_path),
    )  # fmt: skip
    dense, floor = _document(json_path)["records"]
    assert dense["skip_reason"].startswith("not compiled: needs ~4.0 KiB")
    assert dense["temp_bytes"] is None and dense["compile_s"] is None
    assert floor["method"] == "floor" and floor["latency_ms"] is not None


@pytest.mark.parametrize("layout", ["cross", "ring"])
def test_other_layouts(runner, tmp_path, layout):
    json_path = tmp_path / "bench.json"
    _invoke(
        runner, *TINY, "--seq-len", "64", "--method", "linear,one_hot", "--layout", layout,
        "--json", str(json_path),
    )  # fmt: skip
    records = _document(json_path)["records"]
    assert {r["layout"] for r in records} == {layout}
    assert all(r["matches_linear"] for r in records if r["method"] != "floor")
    assert all((r["ring_step"] is not None) == (layout == "ring") for r in records)


def test_bench_ring_subcommand(runner, tmp_path):
    # conftest gives 8 simulated CPU devices, so the latency path runs on a mesh of cp=4.
    json_path = tmp_path / "ring.json"
    result = _invoke(runner, *TINY_RING, "--json", str(json_path))
    assert "RING SUMMARY" in result.output
    document = _document(json_path)
    assert document["benchmark"] == "ring" and document["config"]["cp"] == 4
    assert document["summary"] == {} and document["config"]["seed"] == 0
    records = document["records"]
    reorders = {(r["segments"], r["reorder"]) for r in records}
    names = ("none", "striped(1)", "dual_chunk_swap", "balanced")
    assert reorders == {(s, r) for s in (1, 4) for r in names}
    striped = next(r for r in records if r["segments"] == 1 and r["reorder"] == "striped(1)")
    assert striped["imbalance"] < 1.05
    assert all(r["latency_ms"] is not None and r["skip_reason"] is None for r in records)
    assert all(r["latency_fwd_bwd_ms"]["samples"] >= 1 for r in records)


def test_bench_cp_subcommand(runner, tmp_path):
    json_path = tmp_path / "cp.json"
    args = ("bench", "cp", "--cp", "2", "--seq-len", "64", "--segments", "4", "--heads", "2",
            "--kv-heads", "2", "--head-dim", "8", "--repeats", "1", "--warmup", "0",
            "--time-per-program", "0.01")  # fmt: skip
    result = _invoke(runner, *args, "--json", str(json_path))
    assert "CONTEXT PARALLEL" in result.output
    records = _document(json_path)["records"]
    assert [r["strategy"] for r in records] == ["ring", "all_gather", "all_to_all"]
    assert all(r["latency_ms"]["samples"] >= 1 and r["temp_bytes"] > 0 for r in records)
    assert [r["steps_fwd"] for r in records] == [1, 1, 2]


def test_bench_ring_without_latency(runner, tmp_path):
    json_path = tmp_path / "ring.json"
    _invoke(runner, *TINY_RING, "--no-latency", "--json", str(json_path))
    records = _document(json_path)["records"]
    assert all(r["latency_ms"] is None for r in records)
    assert {r["skip_reason"] for r in records} == {"latency not requested"}


def test_bench_ring_distributions(runner, tmp_path):
    """The named length distributions, each with every reorder; the balanced one keeps rows of
    short documents rank-local (fewer ring steps, an earlier last step than striped)."""
    json_path = tmp_path / "ring.json"
    args = ("--distributions", "short,lognormal,long_short,one", "--segments", "4")
    _invoke(runner, *TINY_RING, *args, "--no-latency", "--json", str(json_path))
    document = _document(json_path)
    records, config = document["records"], document["config"]
    # A key/value shard of float32 keys and values: what one ring step moves to each device.
    shard = config["batch"] * config["seq_len"] // config["cp"] * config["heads"]
    shard *= 2 * config["head_dim"] * 4
    layouts = {r["layout"] for r in records}
    assert layouts == {"filled", "short", "lognormal", "long_short", "one"}
    by = {(r["layout"], r["reorder"]): r for r in records}
    for layout in layouts:
        balanced = by[layout, "balanced"]
        assert balanced["work_max"] <= by[layout, "none"]["work_max"]
        assert balanced["last_step"] <= by[layout, "striped(1)"]["last_step"]
        for reorder in ("none", "striped(1)", "balanced"):
            record = by[layout, reorder]
            assert record["kv_bytes_needed"] == record["last_step"] * shard
    one = by["one", "balanced"]
    assert one["imbalance"] == pytest.approx(1.0, abs=1e-9)  # one document: dual-chunk swap


def test_bench_attention_subcommand(runner, tmp_path):
    json_path = tmp_path / "attention.json"
    _invoke(runner, *TINY_ATTENTION, "--json", str(json_path))
    document = _document(json_path)
    records = document["records"]
    assert document["benchmark"] == "attention" and document["summary"]["matmul_flop_rate"] > 0
    assert {(r["implementation"], r["pass"]) for r in records} == {
        (impl, p) for impl in ("reference", "blockwise") for p in ("fwd", "fwd+bwd")
    }
    assert all(r["skip_reason"] is None and r["latency_ms"]["samples"] == 1 for r in records)
    blockwise = [r for r in records if r["implementation"] == "blockwise"]
    assert all(0 < r["tiles_visited_fraction"] <= 1 for r in blockwise)
    assert all(0 < r["allowed_pair_fraction"] < 1 for r in records)


def test_bench_plan_subcommand(runner, tmp_path):
    json_path = tmp_path / "plan.json"
    tiny = ("--seq-len", "128", "--layers", "2", "--segments", "4", "--heads", "1")
    _invoke(
        runner,
        "bench",
        "plan",
        *tiny,
        "--head-dim",
        "8",
        "--repeats",
        "1",
        "--json",
        str(json_path),
    )
    records = _document(json_path)["records"]
    assert [(r["variant"], r["pass"]) for r in records] == [
        (v, p) for p in ("fwd", "fwd+bwd") for v in ("one plan", "plan per layer")
    ]
    for record in records:
        assert record["skip_reason"] is None and record["hlo_instructions"] > 0
        # One plan leaves no layout work inside the layer loop; a plan per layer does.
        assert (record["layout_ops_in_loop"] > 0) == (record["variant"] == "plan per layer")


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["bench", "plan", "--layers", "0"], "'--layers'"),
        (["bench", "--seed", "-1"], "'--seed'"),
        (["bench", "--batch-size", "0"], "'--batch-size'"),
        (["bench", "--repeats", "0"], "'--repeats'"),
        (["bench", "--warmup", "-1"], "'--warmup'"),
        (["bench", "--time-per-program", "0"], "'--time-per-program'"),
        (["bench", "--compile-timeout", "-1"], "'--compile-timeout'"),
        (["bench", "--json", "/missing/dir/x.json"], "'--json'"),
        (["bench", "--plot", "/missing/dir/x.png"], "'--plot'"),
        (["bench", "--mask-type", ","], "'--mask-type'"),
        (["bench", "--mask-type", "sideways"], "'--mask-type'"),
        (["bench", "--seq-len", ""], "'--seq-len'"),
        (["bench", "--seq-len", "lots"], "'--seq-len'"),
        (["bench", "--segments", "-3"], "'--segments'"),
        (["bench", "--time-per-program", "x"], "'--time-per-program'"),
        (["bench", "--segments", "0"], "'--segments'"),
        (["bench", "--method", "fast"], "'--method'"),
        (["bench", "--layout", "diagonal"], "'--layout'"),
        (["bench", "--memory-limit-bytes", "lots"], "'--memory-limit-bytes'"),
        (["bench", "--memory-limit-bytes", "0"], "'--memory-limit-bytes'"),
        (["bench", "--quick", "--full"], "'--quick' / '--full'"),
        (["bench", "--seed", "x"], "'--seed'"),
        (["bench", "attention", "--dtype", "bogus"], "'--dtype'"),
        (["bench", "attention", "--implementation", "fast"], "'--implementation'"),
        (["bench", "attention", "--mask-type", "sideways"], "'--mask-type'"),
        (["bench", "attention", "--segments", "0"], "'--segments'"),
        (["bench", "attention", "--heads", "0"], "'--heads'"),
        (["bench", "ring", "--seq-len", "100"], "'--seq-len'"),
        (["bench", "ring", "--cp", "0"], "'--cp'"),
        (["bench", "ring", "--stripe-size", ","], "'--stripe-size'"),
        (["bench", "ring", "--json", "/missing/dir/x.json"], "'--json'"),
        # The library's limits (thdkit.MAX_SEQ_LEN, thdkit.MAX_SEGMENTS), checked before any work.
        (["bench", "--seq-len", "3G"], "'--seq-len'"),
        (["bench", "--seq-len", "64,1025M"], "'--seq-len'"),
        (["bench", "--layout", "ring", "--seq-len", "257M"], "'--seq-len'"),
        (["bench", "--segments", "1G"], "'--segments'"),
        (["bench", "--batch-size", "1T"], "'--batch-size'"),
        (["bench", "--time-per-program", "inf"], "'--time-per-program'"),
        (["bench", "--time-per-program", "nan"], "'--time-per-program'"),
        (["bench", "--compile-timeout", "1e300"], "'--compile-timeout'"),
        (["bench", "attention", "--seq-len", "3G"], "'--seq-len'"),
        (["bench", "attention", "--segments", "2G"], "'--segments'"),
        (["bench", "attention", "--block-q", "2G"], "'--block-q'"),
        (["bench", "attention", "--block-kv", "2G"], "'--block-kv'"),
        (["bench", "attention", "--heads", "1T"], "'--heads'"),
        (["bench", "attention", "--head-dim", "1T"], "'--head-dim'"),
        (["bench", "attention", "--dtype", "float64"], "'--dtype'"),
        (["bench", "attention", "--dtype", "int8"], "'--dtype'"),
        (["bench", "plan", "--seq-len", "3G"], "'--seq-len'"),
        (["bench", "plan", "--seq-len", "64", "--segments", "65"], "'--segments'"),
        (["bench", "plan", "--heads", "1T"], "'--heads'"),
        (["bench", "ring", "--seq-len", "3G"], "'--seq-len'"),
        (["bench", "ring", "--cp", "1k", "--seq-len", "1M"], "'--cp'"),
        (["bench", "ring", "--stripe-size", "2G"], "'--stripe-size'"),
        (["bench", "cp", "--seq-len", "3G"], "'--seq-len'"),
        (["bench", "cp", "--cp", "2,512"], "'--cp'"),
        (["bench", "cp", "--stripe-size", "2G"], "'--stripe-size'"),
        (["bench", "cp", "--head-dim", "1T"], "'--head-dim'"),
        # One spelling per idea: a list where the benchmark sweeps it, else one value.
        (["bench", "plan", "--segments", "4,16"], "'--segments'"),
        (["bench", "cp", "--seq-len", "64,128"], "'--seq-len'"),
        (["bench", "ring", "--cp", "2,4"], "'--cp'"),
    ],
)
def test_bad_options_fail_up_front_in_one_line(runner, args, option):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output  # nothing ran: no header, no tables
    assert lines[0].startswith("Error: Invalid value for ") and option in lines[0]


@pytest.mark.parametrize("dtype", ["bogus", "float64", "int32", "complex64"])
def test_dtype_errors_list_the_valid_names(runner, dtype):
    result = runner.invoke(app, ["bench", "attention", "--dtype", dtype])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "'--dtype'" in line and "one of bfloat16, float16, float32, got" in line, line
    if dtype == "float64":  # refused, not run as float32 under a float64 label
        assert "float64 needs x64 (set JAX_ENABLE_X64=1)" in line


def test_float64_runs_with_x64_and_is_recorded_as_it_ran(runner, tmp_path):
    json_path = tmp_path / "attention.json"
    args = [*TINY_ATTENTION, "--seq-len", "64", "--segments", "2", "--warmup", "0"]
    args += ["--implementation", "blockwise", "--dtype", "float64", "--json", str(json_path)]
    with jax.enable_x64(True):
        _invoke(runner, *args)
    document = _document(json_path)
    assert document["config"]["dtype"] == "float64"
    assert [r["dtype"] for r in document["records"]] == ["float64", "float64"]
    assert all(r["skip_reason"] is None for r in document["records"])


def test_default_and_alias_dtypes_are_recorded_canonical(runner, tmp_path):
    json_path = tmp_path / "attention.json"
    args = [*TINY_ATTENTION, "--seq-len", "64", "--segments", "2", "--warmup", "0"]
    _invoke(runner, *args, "--implementation", "blockwise", "--dtype", "half", "--json",
            str(json_path))  # fmt: skip
    document = _document(json_path)
    assert document["config"]["dtype"] == "float16"
    assert {r["dtype"] for r in document["records"]} == {"float16"}


def test_json_names_the_peers_that_ran(runner, tmp_path):
    pytest.importorskip("ejkernel", reason="the peers extra (thdkit[peers]) is not installed")
    json_path = tmp_path / "attention.json"
    args = [*TINY_ATTENTION, "--seq-len", "64", "--segments", "2", "--warmup", "0"]
    _invoke(runner, *args, "--implementation", "ejkernel-xla", "--json", str(json_path))
    peers = _document(json_path)["environment"]["peers"]
    assert peers == {"ejkernel": importlib.metadata.version("ejkernel")}


def test_unknown_option_and_command_fail_in_one_line(runner):
    for args in (["bench", "--bogus"], ["bench", "nope"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert result.output.strip().splitlines() == [result.output.strip()]
        assert result.output.startswith("Error: ")


def test_sizes_take_binary_suffixes(runner, tmp_path):
    json_path = tmp_path / "bench.json"
    _invoke(
        runner, *TINY, "--seq-len", "64", "--method", "linear", "--memory-limit-bytes", "16GiB",
        "--compile-limit-bytes", "1M", "--batch-size", "2", "--json", str(json_path),
    )  # fmt: skip
    config = _document(json_path)["config"]
    assert (config["memory_limit_bytes"], config["compile_limit_bytes"]) == (16 * 2**30, 2**20)
    assert (config["seq_lens"], config["batch"], config["methods"]) == ([64], 2, ["linear"])


@pytest.mark.parametrize(
    ("args", "title"), [(TINY_RING, "RING SUMMARY"), (TINY_ATTENTION, "ATTENTION")]
)
def test_python_m_runs_every_subcommand(tmp_path, args, title):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    json_path = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "thdkit.cli", *args, "--json", str(json_path)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert title in result.stdout
    document = _document(json_path)
    assert document["environment"]["peers"] == {}  # a fresh process: no peer ran
    assert f"thdkit {__version__}" in result.stdout
    if args is TINY_RING:  # the ring command asked XLA:CPU for cp devices before JAX started
        assert document["environment"]["device_count"] == 4
        assert all(r["latency_ms"] is not None for r in document["records"])


OLD_SPELLINGS = (
    "--seq-lens", "--max-segments", "--cps", "--stripe-sizes", "--mask-types", "--methods",
    "--implementations", "--batch",
)  # fmt: skip
IDEAS = {  # config fields naming one idea -> its one option
    ("seq_lens", "seq_len"): "--seq-len",
    ("max_segments", "segments"): "--segments",
    ("cp", "cps"): "--cp",
    ("stripe_size", "stripe_sizes"): "--stripe-size",
    ("mask_type", "mask_types"): "--mask-type",
    ("batch",): "--batch-size",
}


def _commands() -> dict[str, typer.core.TyperCommand]:
    bench = typer.main.get_command(app).commands["bench"]
    return {"bench": bench, **{f"bench {name}": c for name, c in bench.commands.items()}}


def test_one_spelling_per_idea_and_every_option_shows_its_default():
    options: dict[str, set[str]] = {}
    for name, command in _commands().items():
        for param in command.params:
            assert param.help and "[default:" in param.help, (name, param.opts)
            options.setdefault(param.name, set()).update(param.opts)
    for fields, flag in IDEAS.items():
        assert set().union(*(options.get(f, set()) for f in fields)) == {flag}, fields
    spelled = set().union(*options.values())
    assert not spelled & set(OLD_SPELLINGS)


@pytest.mark.parametrize("old", OLD_SPELLINGS)
def test_former_spellings_are_refused(runner, old):
    result = runner.invoke(app, ["bench", old, "1"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: No such option: {old}"), line


def test_help_says_o_of_t_plus_s_and_quick_its_time(runner):
    assert "O(T + S)" in _invoke(runner, "--help").output
    output = " ".join(_invoke(runner, "bench", "--help").output.split())
    assert "about 25 s on two CPU cores" in output.replace("│ ", "").replace(" │", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--seq-len", "-5"], "'--seq-len': must be integers >= 1, got -5"),
        (["bench", "--seq-len", "64,-5"], "'--seq-len': must be integers >= 1, got -5"),
        (["bench", "--segments", "4,0,8"], "'--segments': must be integers >= 1, got 0"),
        (["bench", "--method", "linear,fast"], "'--method': must be among linear, one_hot, dense, "
         "got 'fast'"),
        (["bench", "--seq-len", "64,3G"], "'--seq-len': must be at most 1,073,741,824 "
         "(thdkit.MAX_SEQ_LEN), got 3221225472"),
        (["bench", "cp", "--cp", "2,512"], "'--cp': must be at most 256 "
         "(thdkit.bench.measure.MAX_RANKS), got 512"),
        (["bench", "attention", "--seq-len", "64,128", "--segments", "4,100"],
         "'--segments': must be at most min(seq_lens) = 64, got 100"),
        (["bench", "ring", "--seq-len", "64", "--stripe-size", "1", "--segments", "1,65"],
         "'--segments': must be at most seq_len=64, got 65"),
        (["bench", "--layout", "ring", "--seq-len", "64,257M"], "'--seq-len': must be at most "
         "268,435,456 for the ring layout (its rows hold 4 T), got 269484032"),
    ],
)  # fmt: skip
def test_list_options_report_the_offending_value_itself(runner, args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line == f"Error: Invalid value for {message}", line


def _help(runner, *command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_option_metavar_says_what_it_accepts(runner):
    """A flag shows no value; sizes show BYTES, durations SECONDS, lists ``X,...``, paths PATH."""
    expected = {
        "--memory-limit-bytes": "BYTES", "--compile-limit-bytes": "BYTES",
        "--time-per-program": "SECONDS", "--compile-timeout": "SECONDS",
        "--seq-len": "INT,...", "--segments": "INT,...", "--mask-type": "NAME,...",
        "--method": "NAME,...", "--layout": "self|cross|ring", "--json": "PATH",
        "--plot": "PATH", "--seed": "INT", "--batch-size": "INT",
    }  # fmt: skip
    for name, command in _commands().items():
        for param in command.params:
            flag = param.opts[0]
            if getattr(param, "is_flag", False):
                assert param.metavar == "", (name, flag, param.metavar)
            elif name == "bench" and flag in expected:
                assert param.metavar == expected[flag], (name, flag, param.metavar)
            else:
                # A kind of value (INT, NAME, ...), a list of them, or the names it takes.
                words = r"[A-Z]+(,\.\.\.)?|[a-z_]+(\|[a-z_]+)+"
                assert re.fullmatch(words, param.metavar or ""), (name, flag, param.metavar)
            if flag.endswith("-bytes"):
                assert param.metavar == "BYTES" and "GiB" in param.help, (name, flag)  # e.g. 10GiB
    for command in ([], ["bench"], ["bench", "ring"], ["bench", "attention"]):
        text = _help(runner, *command)
        assert "<bool>" not in text and "<path>" not in text, text
    assert " BYTES " in _help(runner, "bench").split("--memory-limit-bytes", 1)[1][:40]
