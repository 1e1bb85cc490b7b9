"""The ``thdkit`` command (typer): ``thdkit bench`` (the metadata benchmark), ``bench attention``,
``bench plan``, ``bench ring``, ``bench cp``, ``bench compile``. A benchmark's options are its
config's ``OPTIONS``, all checked before any work: a bad one ends the command with exit status 2
and one line naming the option.

One spelling per idea across the subcommands (:data:`thdkit.bench.flags.FLAGS`): every option is
named in the singular, and takes a comma-separated list where the benchmark sweeps it
(``--seq-len 1k,4k`` in ``bench``, ``--seq-len 4096`` in ``bench ring``); every option's help
ends with its default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from typer.core import TyperCommand, TyperGroup

from thdkit.bench.attention import AttentionBench, run_attention_bench
from thdkit.bench.attention_report import attention_table
from thdkit.bench.attention_work import matmul_rate
from thdkit.bench.compile import CompileBench, run_compile_bench
from thdkit.bench.compile_report import compile_table, host_table
from thdkit.bench.cp import CPBench, cp_table, run_cp_bench
from thdkit.bench.flags import FLAGS, flag_name, one_value, swept_flags, value_parser, with_default
from thdkit.bench.measure import (
    BenchConfig,
    Callbacks,
    ConfigError,
    environment,
    peer_versions,
    pending_compiles,
)
from thdkit.bench.plan import PlanBench, plan_table, run_plan_bench
from thdkit.bench.plot import plot_records
from thdkit.bench.report import growth_exponents, metadata_tables, result_line
from thdkit.bench.ring import RingBench, reorder_names, ring_table, run_ring_bench
from thdkit.bench.run import run_sweep
from thdkit.bench.sweep import PRESETS, MetadataSweep
from thdkit.bench.units import device_name, format_tokens

__all__ = ["FLAGS", "app", "main"]

# typer's (vendored or not) click exception: every usage error derives from it.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
Records = list[dict[str, Any]]


class _FlagHelp:
    """``--help`` is a flag: its help line shows no value (typer's default shows ``<bool>``)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Command(_FlagHelp, TyperCommand):
    """A subcommand of ``thdkit bench``."""


class _Group(_FlagHelp, TyperGroup):
    """``thdkit bench``."""


class _OneLineErrors(_FlagHelp, TyperGroup):
    """Reports a usage error as one line, ``Error: Invalid value for '--seed': ...``, exit 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any):
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except _CLICK_ERROR as error:
            if error.format_message().strip():
                typer.echo(f"Error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="thdkit",
    help="Exact O(T + S) varlen-attention metadata for packed sequences in JAX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
"""The ``thdkit`` command."""
_bench_app = typer.Typer(
    help="Benchmarks. Without a subcommand: the metadata benchmark (seqlens_and_offsets): each "
    "method a jax.jit program, timed interleaved with a floor that only reads the inputs; "
    "programs too big for memory are compiled, not run. --quick and --full are presets.",
    invoke_without_command=True,
    add_completion=False,
    cls=_Group,
)
app.add_typer(_bench_app, name="bench")


CONFIGS: tuple[type[BenchConfig], ...] = (
    MetadataSweep,
    AttentionBench,
    PlanBench,
    RingBench,
    CPBench,
)
"""Every subcommand's config (``bench``, ``attention``, ``plan``, ``ring``, ``cp``)."""


def _output_path(path: Path | None) -> Path | None:
    """An output file in an existing, writable folder: checked before the run."""
    if path is not None and (path.is_dir() or not os.access(path.parent, os.W_OK)):
        problem = "is a directory" if path.is_dir() else f"no writable folder {str(path.parent)!r}"
        raise typer.BadParameter(f"cannot write {str(path)!r}: {problem}")
    return path


def _plot_path(path: Path | None) -> Path | None:
    if path is not None and importlib.util.find_spec("matplotlib") is None:
        raise typer.BadParameter('needs matplotlib: pip install "thdkit[bench]"')
    return _output_path(path)


JsonPath = Annotated[
    Path | None,
    typer.Option(
        "--json",
        callback=_output_path,
        metavar="PATH",
        help="Write the report to this file as JSON: the options, the environment (thdkit, jax, "
        "jaxlib and peer versions, backend, devices), the records. \\[default: none]",
    ),
]


def _options(cls: type[BenchConfig]) -> Callable[[Any], Any]:
    """Gives a command, after its own options, those of ``cls`` that have a help text: None
    unless given (a flag: its default)."""
    keyword, options, swept = inspect.Parameter.KEYWORD_ONLY, {}, swept_flags(CONFIGS)
    for field in dataclasses.fields(cls):
        flag, default, help_text = flag_name(field.name), field.default, cls.OPTIONS.get(field.name)
        if help_text is None or help_text[0] is None:
            continue
        if field.type == "bool":
            shown = flag[2:] if default else f"no-{flag[2:]}"
            option = typer.Option(
                f"{flag}/--no-{flag[2:]}", help=with_default(help_text[0], shown),
                show_default=False, metavar="",
            )  # fmt: skip
            options[field.name] = (Annotated[bool, option], default)
            continue
        if field.default_factory is not dataclasses.MISSING:  # Not called: it may start JAX.
            default = "computed when the benchmark starts"
        shown = ", ".join(map(str, default)) if isinstance(default, tuple) else default
        parser, metavar = value_parser(field.type, field.name, cls.OPTIONS[field.name][1])
        text = help_text[0]
        if flag in swept and not metavar.endswith(",..."):
            parser, text = one_value(parser), f"{text} One value in this benchmark."
        option = typer.Option(
            flag, parser=parser, metavar=metavar, help=with_default(text, shown),
            show_default=False,
        )  # fmt: skip
        options[field.name] = (Annotated[Any, option], None)

    def give(command: Callable[..., None]) -> Callable[..., None]:
        hints = typing.get_type_hints(command, include_extras=True)
        own = inspect.signature(command).parameters.values()
        mine = {p.name: (hints[p.name], p.default) for p in own if p.kind is not p.VAR_KEYWORD}
        parameters = [
            inspect.Parameter(name, keyword, annotation=kind, default=default)
            for name, (kind, default) in (mine | options).items()
        ]
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return give


def _run(
    benchmark: str,
    header: str,
    config: BenchConfig,
    run: Callable[..., Records],
    tables: Callable[[Records], list[Any]],
    cells: int,
    json_path: Path | None,
    summary: Callable[[Records], dict[str, Any]] = lambda _: {},
) -> tuple[Records, dict[str, Any], Console]:
    """Runs one benchmark under a progress bar, prints its tables, writes its JSON report;
    ``header`` is formatted with the options (lists comma-separated, T as 1k, 128k, 1M)."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # In a file or pipe with no width asked for, the wider tables stay unwrapped.
        console = Console(width=max(console.width, 160))
    env, options = environment(), dataclasses.asdict(config)
    shown = {k: _shown(k, v) for k, v in options.items()}
    console.print(f"[bold]thdkit bench[/] {header.format(**shown)}")
    devices = f"{env['device_count']} device{'s' * (env['device_count'] != 1)}"
    console.print(
        f"backend [bold]{device_name(env)}[/] ({devices}, {env['usable_cpus']} of "
        f"{env['cpu_count']} CPUs usable), {env['date']}"
    )
    console.print(f"thdkit {env['thdkit']}, jax {env['jax']}, jaxlib {env['jaxlib']}")
    started = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=cells)
        step = lambda text: progress.update(task, description=text)  # noqa: E731
        callbacks = Callbacks(step, lambda: progress.advance(task))
        records = run(config, callbacks=callbacks)
    env["peers"] = peer_versions()  # Those imported by the run: the peers that ran.
    for table in tables(records):
        console.print(table)
    elapsed = time.perf_counter() - started
    console.print(f"{cells} cells in {elapsed:.1f} s on {device_name(env)}")
    if json_path is not None:
        document = {"benchmark": benchmark, "config": options, "environment": env}
        document |= {"summary": summary(records), "records": records}
        json_path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        console.print(f"wrote {json_path}")
    return records, env, console


def _shown(field: str, value: Any) -> Any:
    """An option's value in a header: lists comma-separated, token counts as 1k, 128k, 1M."""
    one = format_tokens if field in ("seq_lens", "seq_len") else str
    return ",".join(map(one, value)) if isinstance(value, tuple) else one(value)


def _config(cls: type[BenchConfig], fields: dict[str, Any], defaults: dict[str, Any] | None = None):
    """``cls`` of the options given, else of ``defaults``; a bad value names its option."""
    given = (defaults or {}) | {key: value for key, value in fields.items() if value is not None}
    try:
        return cls(**given)
    except ConfigError as error:
        raise typer.BadParameter(error.message, param_hint=f"'{flag_name(error.field)}'") from None


def _print_version(value: bool) -> None:
    if value:
        from thdkit import __version__

        typer.echo(f"thdkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            metavar="",
            help="Print the version and exit. \\[default: off]",
        ),
    ] = False,
) -> None:
    """Exact O(T + S) varlen-attention metadata for packed sequences in JAX."""


@_bench_app.callback()
@_options(MetadataSweep)
def _bench(
    ctx: typer.Context,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            metavar="",
            help="A first look, about 25 s on two CPU cores: T 1k to 64k, padding_causal, "
            "shorter timing, 1 GiB run budget. \\[default: off]",
        ),
    ] = False,
    full: Annotated[
        bool,
        typer.Option(
            "--full", metavar="", help="T up to 1M and --segments 16,1024,65536. \\[default: off]"
        ),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            callback=_plot_path,
            metavar="PATH",
            help="Draw bytes and latency over T to this PNG file. \\[default: none]",
        ),
    ] = None,
    json_path: JsonPath = None,
    **fields: Any,
) -> None:
    """The metadata benchmark (the group's help is ``_bench_app``'s)."""
    if ctx.invoked_subcommand is not None:
        return
    if quick and full:
        raise typer.BadParameter("choose one of them", param_hint="'--quick' / '--full'")
    preset = "quick" if quick else "full" if full else "default"
    sweep = _config(MetadataSweep, fields, PRESETS[preset])
    header = f"metadata ({preset}): " + "T={seq_lens}, S={max_segments}, {layout} layout, B={batch}"
    growth = lambda records: {"growth": growth_exponents(records)}  # noqa: E731
    records, env, console = _run(
        "metadata", header, sweep, run_sweep, metadata_tables, len(sweep.cells()), json_path, growth
    )
    if plot is not None:
        console.print(f"wrote {plot} ({plot_records(records, plot, env)})")
    console.print(f"\n[bold]{result_line(records)}[/]")


@_bench_app.command("attention", cls=_Command)
@_options(AttentionBench)
def _bench_attention(json_path: JsonPath = None, **fields: Any) -> None:
    """Packed attention: thdkit's implementations and peers (jax.nn, ejkernel, tokamax).

    Interleaved, in one run.

    Per T and document count: scratch bytes, forward and forward+backward latency where the plan
    fits in memory, latency over blockwise's, efficiency against a matmul, pairs visited/allowed.
    With --soft-cap and --sinks, thdkit's implementations also with those features, beside plain.
    """
    config = _config(AttentionBench, fields)
    header = "attention: T={seq_lens}, B={batch}, H={heads}, D={head_dim}, {mask_type}"
    header += ", soft cap {logits_soft_cap}" * (config.logits_soft_cap is not None)
    header += ", sinks" * config.sinks
    cells = len(config.seq_lens) * len(config.segments)
    tables = lambda records: [attention_table(records)]  # noqa: E731
    rate = lambda records: {"matmul_flop_rate": matmul_rate(records)}  # noqa: E731
    _run("attention", header, config, run_attention_bench, tables, cells, json_path, rate)


@_bench_app.command("plan", cls=_Command)
@_options(PlanBench)
def _bench_plan(json_path: JsonPath = None, **fields: Any) -> None:
    """A scanned stack of attention layers planned once per step vs planned in every layer.

    Per T and pass (forward; forward+backward with rematerialised layers): the layout work
    traced inside the layer loop, the optimised HLO's size, compile time and latency.
    """
    config = _config(PlanBench, fields)
    header = "plan: T={seq_lens}, L={layers}, B={batch}, H={heads}, D={head_dim}, S={segments}"
    tables = lambda records: [plan_table(records)]  # noqa: E731
    _run("plan", header, config, run_plan_bench, tables, len(config.seq_lens), json_path)


@_bench_app.command("ring", cls=_Command)
@_options(RingBench)
def _bench_ring(json_path: JsonPath = None, **fields: Any) -> None:
    """Context-parallel work balance: allowed pairs and visited tiles per rank, by reorder.

    Per reorder of causal packed rows (none, striped, dual-chunk swap): the busiest rank's work
    over the mean, the ring steps ring_attention skips, and its latency on cp local devices.
    """
    config = _config(RingBench, fields)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:  # Works before JAX's backend starts.
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={config.cp}"
    header = "ring: cp={cp}, T={seq_len}, B={batch}"
    cells = len(config.segments) * len(reorder_names(config.stripe_sizes))
    tables = lambda records: [ring_table(records)]  # noqa: E731
    _run("ring", header, config, run_ring_bench, tables, cells, json_path)


@_bench_app.command("cp", cls=_Command)
@_options(CPBench)
def _bench_cp(json_path: JsonPath = None, **fields: Any) -> None:
    """Context-parallel strategies (ring, all_gather, all_to_all) side by side.

    Per cp: bytes each device receives, dependent collective steps, visited tiles per rank
    (max / mean), and the fwd+bwd program's scratch bytes and latency on cp local devices.
    """
    config = _config(CPBench, fields)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:  # Works before JAX's backend starts.
        count = max(config.cps)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"
    header = "cp: cp={cps}, T={seq_len}, B={batch}, H_q={heads}, H_kv={kv_heads}"
    tables = lambda records: [cp_table(records)]  # noqa: E731
    _run("cp", header, config, run_cp_bench, tables, len(config.cps), json_path)


@_bench_app.command("compile", cls=_Command)
@_options(CompileBench)
def _bench_compile(json_path: JsonPath = None, **fields: Any) -> None:
    """Compile economy: the XLA programs each entry point compiles, and the host-side metadata.

    Per entry point (called eagerly): programs compiled on a new shape and on a repeated one,
    compile seconds, the main program's HLO size, memory mappings per program (Linux). Then
    seqlens_and_offsets on NumPy inputs (host, nothing compiled) vs jit(seqlens_and_offsets), new
    and warm.
    """
    config = _config(CompileBench, fields)
    header = (
        "compile: T={entry_seq_len}, L={layers}, B={batch}, H={heads}, D={head_dim}, "
        "S={entry_segments}; host vs device: T={seq_lens}, S={segments}"
    )
    cells = len(config.entries) + len(config.seq_lens) * len(config.segments)
    tables = lambda records: [compile_table(records), host_table(records)]  # noqa: E731
    _run("compile", header, config, run_compile_bench, tables, cells, json_path)


def main() -> None:
    """Runs the ``thdkit`` command (:func:`thdkit.cli.main` calls it).

    Raises:
        SystemExit: always, with the command's exit status.
    """
    try:
        app()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if pending_compiles():  # XLA aborts the interpreter's shutdown under a compile in flight.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise
