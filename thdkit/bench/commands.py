"""The ``thdkit`` command line (typer): ``thdkit bench``, ``bench attention``, ``bench ring``.

    thdkit --version
    thdkit bench --quick                    # a first look, under a minute on two CPU cores
    thdkit bench                            # the default sweep: T = 1k..128k, three mask types
    thdkit bench --max-segments 16,1024 --json out.json --plot out.png
    thdkit bench --full                     # T up to 1M, S up to 65536
    thdkit bench attention                  # reference vs blockwise packed attention
    thdkit bench ring                       # context-parallel work balance by reorder

``bench`` is a group: with no subcommand it runs the metadata benchmark (its options are the
group's); the others are its subcommands. A benchmark's options are the fields of its config
(:class:`~thdkit.bench.sweep.MetadataSweep`, :class:`~thdkit.bench.attention.AttentionBench`,
:class:`~thdkit.bench.ring.RingBench`), field ``x_y`` (or ``x_y_s``) as ``--x-y``, with the help
texts of :data:`HELP`, declared once. The config checks every value before any work starts: a bad
one ends the command with exit code 2 and one line naming the option.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from typer.core import TyperGroup

from thdkit.bench.attention import AttentionBench, attention_table, run_attention_bench
from thdkit.bench.measure import BenchConfig, ConfigError, environment, pending_compiles, write_json
from thdkit.bench.report import growth_exponents, metadata_tables, plot_records
from thdkit.bench.ring import RingBench, reorder_names, ring_table, run_ring_bench
from thdkit.bench.run import run_sweep
from thdkit.bench.sweep import PRESETS, MetadataSweep

__all__ = ["HELP", "app", "bench_app", "main", "parse_names", "parse_size", "parse_sizes"]

HELP = {
    "seq_lens": "T values, comma-separated; k/M suffixes ok.",
    "seq_len": "T, tokens per row; k/M suffixes ok.",
    "max_segments": "S values (max_segments_per_seq), comma-separated.",
    "segments": "Documents per row, comma-separated; one layout each.",
    "batch": "B, rows per batch.",
    "mask_types": "Mask types, comma-separated.",
    "mask_type": "Mask type name.",
    "methods": "Methods of seqlens_and_offsets, comma-separated (the floor always runs).",
    "layout": "self: packed rows; cross: T_kv = T; ring: worst step of striped cp=4.",
    "implementations": "Comma-separated. \\[default: reference,blockwise (+cudnn on a GPU)]",
    "dtype": "Input dtype. \\[default: bfloat16 on a GPU, else float32]",
    "heads": "H, query and key/value heads.",
    "head_dim": "D, head dim.",
    "cp": "Ranks of the ring.",
    "stripe_sizes": "Stripe sizes; a striped reorder is measured for each.",
    "latency": "Time ring_attention on a mesh of cp devices.",
    "seed": "Seed of the random layouts and inputs.",
    "warmup": "Untimed runs per program.",
    "repeats": "Most timed runs per program.",
    "time_per_program_s": "Seconds of timed runs per program; slow ones stop early.",
    "compile_timeout_s": "Seconds a compile may take before its program is skipped.",
    "memory_limit_bytes": "Run budget in bytes (k/M/G suffixes ok); plans above it are 'not run'. "
    "\\[default: half the memory available]",
    "compile_limit_bytes": "Skip compiling methods estimated above this many bytes. "
    "\\[default: 8x total memory]",
}
"""The help text of every benchmark option, by config field (fields not here are no options)."""

# typer's (vendored or not) click exception: every usage error derives from it.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineErrors(TyperGroup):
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
    help="Exact O(T) varlen-attention metadata for packed sequences in JAX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Benchmarks. Without a subcommand: the metadata benchmark (seqlens_and_offsets).",
    invoke_without_command=True,
    add_completion=False,
)
app.add_typer(bench_app, name="bench")

_SIZE_SUFFIXES = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """An int with an optional binary suffix: ``"4096"``, ``"128k"``, ``"1M"``, ``"2GiB"``.

    Args:
        text: the value as typed.

    Returns:
        the int.

    Raises:
        typer.BadParameter: not a number with a known suffix.

    Example:
        >>> parse_size("128k"), parse_size("1M"), parse_size("2GiB"), parse_size("16")
        (131072, 1048576, 2147483648, 16)
    """
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise typer.BadParameter(f"expected an integer such as 4096, 128k or 1M, got {text!r}")
    return int(match[1]) * _SIZE_SUFFIXES[match[2]]


def parse_sizes(text: str) -> tuple[int, ...]:
    """A comma-separated list of :func:`parse_size` values (empty parts are dropped).

    Example:
        >>> parse_sizes("1k,4k, 16384")
        (1024, 4096, 16384)
    """
    return tuple(parse_size(part) for part in text.split(",") if part.strip())


def parse_names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names, stripped (empty parts are dropped).

    Example:
        >>> parse_names("linear, one_hot")
        ('linear', 'one_hot')
    """
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _option_name(field: str) -> str:
    return "--" + field.removesuffix("_s").replace("_", "-")


def _extra(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _field_option(field: dataclasses.Field) -> inspect.Parameter:
    """The typer option of a config field; its value is None unless given on the command line."""
    kind, name, default = str(field.type), _option_name(field.name), field.default
    parser, metavar = {
        "tuple[int, ...]": (parse_sizes, "SIZES"),
        "tuple[str, ...]": (parse_names, "NAMES"),
    }.get(kind, (None, None))
    if field.name.endswith("_bytes") or field.name == "seq_len":
        parser, metavar = parse_size, "SIZE"
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    option = typer.Option(
        f"{name}/--no-{name[2:]}" if kind == "bool" else name,
        parser=parser,
        metavar=metavar,
        help=HELP[field.name],
        show_default=str(shown) if shown not in (None, dataclasses.MISSING) else False,
    )
    if kind == "bool":
        return _extra(field.name, Annotated[bool, option], default)
    python_type = {"int": int, "float": float}.get(kind, Any if parser else str)
    return _extra(field.name, Annotated[python_type | None, option])


def _output_path(path: Path | None) -> Path | None:
    """An output file in an existing, writable folder: checked before the run."""
    if path is not None and (path.is_dir() or not os.access(path.parent, os.W_OK)):
        problem = "is a directory" if path.is_dir() else f"no writable folder {str(path.parent)!r}"
        raise typer.BadParameter(f"cannot write {str(path)!r}: {problem}")
    return path


def _plot_path(path: Path | None) -> Path | None:
    if path is not None:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            raise typer.BadParameter('needs matplotlib: pip install "thdkit[bench]"') from None
    return _output_path(path)


_JSON = _extra(
    "json_path",
    Annotated[
        Path | None,
        typer.Option("--json", callback=_output_path, help="Write the report as JSON here."),
    ],
)


def _options(config: type[BenchConfig], *extra: inspect.Parameter) -> Callable[[Any], Any]:
    """Gives a command the options of ``config``'s fields (those in :data:`HELP`) and ``extra``."""
    fields = [_field_option(f) for f in dataclasses.fields(config) if f.name in HELP]

    def give(command: Callable[..., None]) -> Callable[..., None]:
        parameters = [*extra, *fields, _JSON]
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return give


def _config(
    cls: type[BenchConfig], fields: dict[str, Any], defaults: dict[str, Any] | None = None
) -> Any:
    """``cls(**fields)``, None fields from ``defaults`` or left to the class; a bad value names
    its option (one line, exit 2)."""
    given = {k: (defaults or {}).get(k) if v is None else v for k, v in fields.items()}
    try:
        return cls(**{key: value for key, value in given.items() if value is not None})
    except ConfigError as error:
        message = str(error).removeprefix(f"{error.field} ")
        raise typer.BadParameter(message, param_hint=f"'{_option_name(error.field)}'") from None


def _run(
    benchmark: str,
    header: str,
    config: BenchConfig,
    run: Callable[..., list[dict[str, Any]]],
    tables: Callable[[list[dict[str, Any]]], list[Any]],
    *,
    cells: int,
    json_path: Path | None,
    summary: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], Console]:
    """Runs one benchmark under a progress bar, prints its tables, writes its JSON."""
    console = Console()
    if not console.is_terminal:
        # Tables written to a file or pipe stay readable instead of wrapping at 80 columns.
        console = Console(width=max(console.width, 160))
    env = environment()
    console.print(f"[bold]thdkit bench[/] {header}")
    console.print(
        f"backend [bold]{env['backend']}[/] (device kind {env['device_kind']}, "
        f"{env['device_count']} device(s)), jax {env['jax']} / jaxlib {env['jaxlib']}, "
        f"{env['usable_cpus']} usable CPU(s) of {env['cpu_count']}, {env['date']}"
    )
    started = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=cells)
        records = run(
            config,
            on_step=lambda text: progress.update(task, description=text),
            on_cell_done=lambda: progress.advance(task),
        )
    for table in tables(records):
        console.print(table)
    elapsed = time.perf_counter() - started
    console.print(f"{cells} cells in {elapsed:.1f} s on {env['backend']} ({env['device_kind']})")
    if json_path is not None:
        extra = summary(records) if summary is not None else None
        write_json(
            json_path,
            benchmark=benchmark,
            config=config,
            environment=env,
            records=records,
            summary=extra,
        )
        console.print(f"wrote {json_path}")
    return records, env, console


def _print_version(value: bool) -> None:
    if value:
        from thdkit import __version__

        typer.echo(f"thdkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Exact O(T) varlen-attention metadata for packed sequences in JAX."""


@bench_app.callback()
@_options(
    MetadataSweep,
    _extra("ctx", typer.Context),
    _extra(
        "quick",
        Annotated[
            bool, typer.Option("--quick", help="A first look: under a minute on two CPU cores.")
        ],
        False,
    ),
    _extra(
        "full",
        Annotated[bool, typer.Option("--full", help="T up to 1M (1,048,576) and S up to 65,536.")],
        False,
    ),
    _extra(
        "plot_path",
        Annotated[
            Path | None,
            typer.Option(
                "--plot", callback=_plot_path, help="Write a PNG of temp bytes and latency vs T."
            ),
        ],
    ),
)
def bench(
    ctx: typer.Context,
    *,
    quick: bool,
    full: bool,
    plot_path: Path | None,
    json_path: Path | None,
    **fields: Any,
) -> None:
    """Benchmark seqlens_and_offsets: memory, work and latency of each method over T, S, masks.

    Every method is its own jax.jit program; a "floor" program that only reads the inputs runs
    interleaved with them. Plans come from compilation alone; programs that do not fit comfortably
    in memory are compiled but not run. --quick and --full are presets; options given win.
    """
    if ctx.invoked_subcommand is not None:
        return
    if quick and full:
        raise typer.BadParameter("choose one of them", param_hint="'--quick' / '--full'")
    preset = "quick" if quick else "full" if full else "default"
    sweep = _config(MetadataSweep, fields, PRESETS[preset])
    header = (
        f"(metadata, {preset} sweep): {sweep.layout} layout, B={sweep.batch}, "
        f"T={','.join(map(str, sweep.seq_lens))}, S={','.join(map(str, sweep.max_segments))}"
    )
    records, env, console = _run(
        "metadata", header, sweep, run_sweep, metadata_tables, cells=len(sweep.cells()),
        json_path=json_path, summary=lambda records: {"growth": growth_exponents(records)},
    )  # fmt: skip
    if plot_path is not None:
        mask_plotted = plot_records(records, plot_path, environment=env)
        console.print(f"wrote {plot_path} ({mask_plotted})")


@bench_app.command("attention")
@_options(AttentionBench)
def bench_attention(*, json_path: Path | None, **fields: Any) -> None:
    """Packed attention: the dense reference against blockwise (and cuDNN on a GPU).

    For each T and document count: scratch bytes from the compiled plan, forward and
    forward+backward latency where the plan fits in memory, and the fraction of tiles the
    blockwise method visits next to the fraction of allowed pairs.
    """
    config = _config(AttentionBench, fields)
    header = (
        f"attention: T={','.join(map(str, config.seq_lens))}, B={config.batch}, H={config.heads}, "
        f"D={config.head_dim}, {config.mask_type}"
    )
    cells = len(config.seq_lens) * len(config.segments)
    tables = lambda records: [attention_table(records)]  # noqa: E731
    _run("attention", header, config, run_attention_bench, tables, cells=cells, json_path=json_path)


@bench_app.command("ring")
@_options(RingBench)
def bench_ring(*, json_path: Path | None, **fields: Any) -> None:
    """Context-parallel work balance: allowed pairs and visited tiles per rank, by reorder.

    Causal packed rows (documents filling the row) are reordered (none, striped, dual-chunk
    swap) and split over cp ranks; for each reorder the table gives the busiest rank's work over
    the mean, the ring steps ring_attention skips, and its latency on the local devices (on a
    CPU, cp simulated devices share the host's cores).
    """
    config = _config(RingBench, fields)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        # Ask XLA:CPU for cp devices (effective when no backend has started yet).
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={config.cp}".strip()
        )
    header = f"ring: cp={config.cp}, T={config.seq_len}, B={config.batch}"
    cells = len(config.segments) * len(reorder_names(config.stripe_sizes))
    tables = lambda records: [ring_table(records)]  # noqa: E731
    _run("ring", header, config, run_ring_bench, tables, cells=cells, json_path=json_path)


def main() -> None:
    """Runs the command line (the console script's :func:`thdkit.cli.main` calls it).

    Raises:
        SystemExit: with the command's exit status.
    """
    try:
        app()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        # XLA aborts the interpreter's shutdown while an abandoned compile is still running.
        if pending_compiles():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise
