"""The ``thdkit`` command line.

    thdkit --version
    thdkit bench --quick                    # a first look, under a minute on two CPU cores
    thdkit bench                            # the default sweep: T = 1k..128k, three mask types
    thdkit bench --max-segments 16,1024 --json out.json --plot out.png
    thdkit bench --full                     # T up to 1M, S up to 65536
    thdkit bench attention                  # reference vs blockwise packed attention
    thdkit bench ring                       # context-parallel work balance by reorder

``bench`` is a group: with no subcommand it runs the metadata benchmark (its options are the
group's); other benchmarks hang off it as subcommands (``thdkit bench <name> ...``).
"""

from __future__ import annotations

import enum
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["app", "bench_app", "main"]

app = typer.Typer(
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


class LayoutChoice(enum.StrEnum):
    """Which layout the metadata benchmark draws."""

    SELF = "self"
    CROSS = "cross"
    RING = "ring"


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
    """A comma-separated list of :func:`parse_size` values.

    Example:
        >>> parse_sizes("1k,4k, 16384")
        (1024, 4096, 16384)
    """
    return tuple(parse_size(part) for part in text.split(",") if part.strip())


def parse_names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names, stripped.

    Example:
        >>> parse_names("linear, one_hot")
        ('linear', 'one_hot')
    """
    return tuple(part.strip() for part in text.split(",") if part.strip())


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


def _sweep_options(
    *,
    preset: str,
    seq_lens: str | None,
    max_segments: str | None,
    batch: int,
    mask_types: str | None,
    methods: str | None,
    layout: LayoutChoice,
    seed: int,
    warmup: int | None,
    repeats: int | None,
    time_per_method: float | None,
    compile_timeout: float,
    memory_limit_bytes: str | None,
    compile_limit_bytes: str | None,
) -> dict[str, Any]:
    """The sweep's fields: what was given on the command line, the preset for the rest."""
    from thdkit.bench.metadata import METHODS, PRESETS

    defaults = PRESETS[preset]
    given = {
        "seq_lens": seq_lens and parse_sizes(seq_lens),
        "max_segments": max_segments and parse_sizes(max_segments),
        "mask_types": mask_types and parse_names(mask_types),
        "warmup": warmup,
        "repeats": repeats,
        "time_per_method_s": time_per_method,
        "memory_limit_bytes": memory_limit_bytes and parse_size(memory_limit_bytes),
    }
    fields = {key: defaults[key] if value is None else value for key, value in given.items()}
    return fields | {
        "batch": batch,
        "methods": parse_names(methods) if methods else METHODS,
        "layout": layout.value,
        "seed": seed,
        "compile_timeout_s": compile_timeout,
        "compile_limit_bytes": compile_limit_bytes and parse_size(compile_limit_bytes),
    }


def _environment_line(environment: dict[str, Any]) -> str:
    return (
        f"backend [bold]{environment['backend']}[/] (device kind {environment['device_kind']}, "
        f"{environment['device_count']} device(s)), jax {environment['jax']} / jaxlib "
        f"{environment['jaxlib']}, {environment['usable_cpus']} usable CPU(s) of "
        f"{environment['cpu_count']}, {environment['date']}"
    )


@bench_app.callback()
def bench(
    ctx: typer.Context,
    seq_lens: Annotated[
        str | None,
        typer.Option(
            help="T values, comma-separated; k/M suffixes ok. \\[default: 1k,4k,16k,64k,128k]"
        ),
    ] = None,
    max_segments: Annotated[
        str | None,
        typer.Option(help="S values (max_segments_per_seq), comma-separated. \\[default: 16]"),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="B, rows per batch.")] = 1,
    mask_types: Annotated[
        str | None,
        typer.Option(
            help="Mask types, comma-separated. "
            "\\[default: padding,padding_causal,padding_causal_bottom_right]"
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(help="Methods, comma-separated. \\[default: linear,one_hot,dense]"),
    ] = None,
    layout: Annotated[
        LayoutChoice,
        typer.Option(help="self: packed rows; cross: T_kv = T; ring: worst step of striped cp=4."),
    ] = LayoutChoice.SELF,
    seed: Annotated[int, typer.Option(help="Seed of the random layouts.")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="A first look: under a minute on two CPU cores.")
    ] = False,
    full: Annotated[
        bool, typer.Option("--full", help="T up to 1M (1,048,576) and S up to 65,536.")
    ] = False,
    warmup: Annotated[
        int | None, typer.Option(min=0, help="Untimed runs per program. \\[default: 2]")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(min=1, help="Most timed runs per program. \\[default: 20]")
    ] = None,
    time_per_method: Annotated[
        float | None,
        typer.Option(
            help="Seconds of timed runs per program; slow ones stop early. \\[default: 1]"
        ),
    ] = None,
    compile_timeout: Annotated[
        float, typer.Option(help="Seconds a compile may take before its method is skipped.")
    ] = 60.0,
    memory_limit_bytes: Annotated[
        str | None,
        typer.Option(
            help="Run budget in bytes (k/M/G suffixes ok); plans above it are 'not run'. "
            "\\[default: half the memory available]"
        ),
    ] = None,
    compile_limit_bytes: Annotated[
        str | None,
        typer.Option(
            help="Skip compiling methods estimated above this many bytes. "
            "\\[default: 8x total memory]"
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write one record per (cell, method) here.")
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of temp bytes and latency vs T.")
    ] = None,
) -> None:
    """Benchmark seqlens_and_offsets: memory, work and latency of each method over T, S, masks.

    Every method is its own jax.jit program; a "floor" program that only reads the inputs runs
    interleaved with them. Plans come from compilation alone; programs that do not fit comfortably
    in memory are compiled but not run.
    """
    if ctx.invoked_subcommand is not None:
        return
    if quick and full:
        raise typer.BadParameter("choose one of --quick and --full")
    # Imported here so that `thdkit --version` and `--help` stay fast.
    from thdkit.bench.measure import environment
    from thdkit.bench.metadata import (
        MetadataSweep,
        growth_table,
        latency_table,
        memory_table,
        plot_records,
        run_sweep,
        work_table,
        write_json,
    )

    preset = "quick" if quick else "full" if full else "default"
    options = _sweep_options(
        preset=preset,
        seq_lens=seq_lens,
        max_segments=max_segments,
        batch=batch,
        mask_types=mask_types,
        methods=methods,
        layout=layout,
        seed=seed,
        warmup=warmup,
        repeats=repeats,
        time_per_method=time_per_method,
        compile_timeout=compile_timeout,
        memory_limit_bytes=memory_limit_bytes,
        compile_limit_bytes=compile_limit_bytes,
    )
    try:
        sweep = MetadataSweep(**options)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    console = _console()
    env = environment()
    console.print(
        f"[bold]thdkit bench[/] (metadata, {preset} sweep): {sweep.layout} layout, "
        f"B={sweep.batch}, T={','.join(map(str, sweep.seq_lens))}, "
        f"S={','.join(map(str, sweep.max_segments))}"
    )
    console.print(_environment_line(env))
    started = time.perf_counter()
    cells = sweep.cells()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=len(cells))
        records = run_sweep(
            sweep,
            on_step=lambda text: progress.update(task, description=text),
            on_cell_done=lambda _: progress.advance(task),
        )
    for table in (memory_table, work_table, latency_table):
        console.print(table(records))
    if len(sweep.seq_lens) > 1:
        console.print(growth_table(records))
    console.print(
        f"{len(cells)} cells in {time.perf_counter() - started:.1f} s on "
        f"{env['backend']} ({env['device_kind']})"
    )
    if json_path is not None:
        write_json(json_path, records, environment=env, sweep=sweep)
        console.print(f"wrote {json_path}")
    if plot_path is not None:
        mask_plotted = plot_records(records, plot_path, environment=env)
        console.print(f"wrote {plot_path} ({mask_plotted})")


def main() -> None:
    """Console-script entry point."""
    from thdkit.bench.measure import pending_compiles

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


if __name__ == "__main__":
    main()


def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        # Tables written to a file or pipe stay readable instead of wrapping at 80 columns.
        console = Console(width=max(console.width, 160))
    return console


def _simulate_cpu_devices(count: int) -> None:
    """Asks XLA:CPU for ``count`` devices, when no backend has started and none were asked for."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


@bench_app.command("ring")
def bench_ring(
    cp: Annotated[int, typer.Option(help="Ranks of the ring.")] = 4,
    seq_len: Annotated[str, typer.Option(help="T, tokens per row (k/M suffixes ok).")] = "4k",
    segments: Annotated[str, typer.Option(help="Documents per row, one layout each.")] = "1,16",
    stripe_sizes: Annotated[str, typer.Option(help="Striped reorders to measure.")] = "1,2,128",
    batch: Annotated[int, typer.Option(help="B, rows per layout.")] = 1,
    latency: Annotated[
        bool, typer.Option(help="Time ring_attention on a mesh of cp devices.")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the document lengths.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the records as JSON here.")
    ] = None,
) -> None:
    """Context-parallel work balance: allowed pairs and visited tiles per rank, by reorder.

    Causal packed rows (documents filling the row) are reordered (none, striped, dual-chunk
    swap) and split over cp ranks; for each reorder the table gives the busiest rank's work over
    the mean, the ring steps ring_attention skips, and its latency on the local devices (on a
    CPU, cp simulated devices share the host's cores).
    """
    _simulate_cpu_devices(cp)
    from thdkit.bench.measure import environment
    from thdkit.bench.ring import RingBench, ring_table, run_ring_bench, write_json

    try:
        config = RingBench(
            cp=cp,
            seq_len=parse_size(seq_len),
            batch=batch,
            segments=parse_sizes(segments),
            stripe_sizes=parse_sizes(stripe_sizes),
            latency=latency,
            seed=seed,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    console = _console()
    env = environment()
    console.print(f"[bold]thdkit bench ring[/]: cp={cp}, T={config.seq_len}, B={batch}")
    console.print(_environment_line(env))
    with console.status("starting") as status:
        records = run_ring_bench(config, on_step=status.update)
    console.print(ring_table(records))
    if json_path is not None:
        write_json(json_path, records, environment=env, config=config)
        console.print(f"wrote {json_path}")


@bench_app.command("attention")
def bench_attention(
    seq_lens: Annotated[str, typer.Option(help="T values, comma-separated.")] = "8k,32k",
    segments: Annotated[str, typer.Option(help="Documents per row, one layout each.")] = "16",
    batch: Annotated[int, typer.Option(help="B.")] = 1,
    heads: Annotated[int, typer.Option(help="H, query and key/value heads.")] = 8,
    head_dim: Annotated[int, typer.Option(help="D, head dim.")] = 64,
    mask_type: Annotated[str, typer.Option(help="Mask type name.")] = "padding_causal",
    implementations: Annotated[
        str | None,
        typer.Option(help="Comma-separated; default reference,blockwise (+cudnn on a GPU)."),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Input dtype; default bfloat16 on a GPU, else float32.")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Most timed runs per program.")] = 10,
    memory_limit_bytes: Annotated[
        str | None, typer.Option(help="Run budget (e.g. 8G); default half of free memory.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of layouts and inputs.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the records as JSON here.")
    ] = None,
) -> None:
    """Packed attention: the dense reference against blockwise (and cuDNN on a GPU).

    For each T and document count: scratch bytes from the compiled plan, forward and
    forward+backward latency where the plan fits in memory, and the fraction of tiles the
    blockwise method visits next to the fraction of allowed pairs.
    """
    from thdkit.bench.attention import (
        AttentionBench,
        attention_table,
        run_attention_bench,
        write_json,
    )
    from thdkit.bench.measure import environment

    options: dict[str, Any] = dict(
        seq_lens=parse_sizes(seq_lens),
        segments=parse_sizes(segments),
        batch=batch,
        heads=heads,
        head_dim=head_dim,
        mask_type=mask_type,
        dtype=dtype,
        repeats=repeats,
        memory_limit_bytes=memory_limit_bytes and parse_size(memory_limit_bytes),
        seed=seed,
    )
    if implementations:
        options["implementations"] = parse_names(implementations)
    try:
        config = AttentionBench(**options)
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from None
    console = _console()
    env = environment()
    console.print(
        f"[bold]thdkit bench attention[/]: T={','.join(map(str, config.seq_lens))}, "
        f"B={batch}, H={heads}, D={head_dim}, {config.mask_type}"
    )
    console.print(_environment_line(env))
    with console.status("starting") as status:
        records = run_attention_bench(config, on_step=status.update)
    console.print(attention_table(records))
    if json_path is not None:
        write_json(json_path, records, environment=env, config=config)
        console.print(f"wrote {json_path}")
