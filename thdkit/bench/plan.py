"""The plan benchmark: a stack of attention layers under ``lax.scan``, planned once or per layer.

Axis legend: B batch, T tokens per row, H heads, D head dim, L layers, S documents per row.
Each layer projects its input (``x @ w_l``) and adds packed causal attention over it. "one plan"
computes :func:`thdkit.plan_attention` once per step and closes every layer over it; "plan per
layer" uses the keyword form, which plans inside each layer. Both passes are measured: forward,
and forward + backward with each layer rematerialised (``jax.checkpoint``), as long stacks are
trained. Reported per program: the layout operations traced inside the layer loop (cumulative
max/min, the run-length and tile-range passes), the optimised HLO's instruction count, compile
time, scratch bytes and latency.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from rich.table import Table

from thdkit._src import synth
from thdkit._src.segments import Segments
from thdkit.bench import measure
from thdkit.bench.measure import SILENT, Callbacks, Options, PlanConfig, median
from thdkit.kernels import attention, plan_attention

__all__ = ["PlanBench", "run_plan_bench"]

VARIANTS = ("one plan", "plan per layer")
_LAYOUT_PRIMITIVES = ("cummax", "cummin")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanBench(PlanConfig):
    """What the plan benchmark measures: ``OPTIONS`` documents each option.

    Example:
        >>> PlanBench(layers=0)
        Traceback (most recent call last):
        ...
        thdkit.bench.measure.ConfigError: layers: must be an integer >= 1, got 0
    """

    OPTIONS: ClassVar[Options] = {
        **PlanConfig.OPTIONS,
        "layers": ("L, attention layers in the scanned stack.", 1),
        "segments": ("Documents per row.", 1),
        "heads": ("H, query and key/value heads.", 1),
        "head_dim": ("D, head dim.", 1),
    }
    seq_lens: tuple[int, ...] = (4096,)
    layers: int = 24
    segments: int = 16
    heads: int = 2
    head_dim: int = 32

    def _relations(self) -> list[tuple[str, Callable[[Any], bool], str]]:
        shortest = min(self.seq_lens)
        return [("segments", lambda s: s <= shortest, f"at most min(seq_lens) = {shortest}")]

    def host_input_bytes(self) -> int:
        """As :meth:`BenchConfig.host_input_bytes`, with the layers' weights (L * D * D)."""
        weights = 12 * self.layers * self.head_dim**2  # float64 drawn, float32 passed
        return super().host_input_bytes() + weights


def _program(config: PlanBench, variant: str, passes: str) -> Callable[..., Any]:
    """``fn(w, x, ids, pos)``: the stack's output (fwd) or its weight gradient (fwd+bwd)."""
    options = {"mask_type": "padding_causal", "max_segments_per_seq": config.segments}

    def stack(w, x, ids, pos):
        plan = plan_attention(Segments.from_ids(ids, pos), **options)

        def layer(x, w_l):
            h = x @ w_l
            if variant == "one plan":
                return x + attention(h, h, h, plan=plan), None
            keywords = {"segment_ids_q": ids, "segment_pos_q": pos, **options}
            return x + attention(h, h, h, **keywords), None

        body = layer if passes == "fwd" else jax.checkpoint(layer)
        return jax.lax.scan(body, x, w)[0]

    if passes == "fwd":
        return stack
    return jax.grad(lambda w, x, ids, pos: jnp.sum(stack(w, x, ids, pos) ** 2))


def _ops_in_loops(fn: Callable[..., Any], args: Sequence[Any]) -> int:
    """Layout operations (cumulative max/min) traced inside the program's scan bodies."""
    count = 0
    for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns:
        if eqn.primitive.name == "scan":
            text = str(eqn.params["jaxpr"])
            count += sum(text.count(f"{name}[") for name in _LAYOUT_PRIMITIVES)
    return count


def run_plan_bench(config: PlanBench, *, callbacks: Callbacks = SILENT) -> list[dict[str, Any]]:
    """Compiles and times the stack planned once and planned per layer, for each T and pass.

    Args:
        config: the options.
        callbacks: progress reports (:class:`thdkit.bench.measure.Callbacks`); a cell is one
            T.

    Returns:
        JSON-ready records, one per (seq_len, variant, pass): the options, the plan's sizes and
        costs, ``layout_ops_in_loop``, ``hlo_instructions``, ``latency_ms`` and ``skip_reason``.

    Example:
        >>> config = PlanBench(seq_lens=(256,), layers=2, segments=4, heads=1, head_dim=8,
        ...                    repeats=1, warmup=0)
        >>> [(r["variant"], r["pass"], r["layout_ops_in_loop"] > 0)
        ...  for r in run_plan_bench(config)]  # doctest: +NORMALIZE_WHITESPACE
        [('one plan', 'fwd', False), ('plan per layer', 'fwd', True),
         ('one plan', 'fwd+bwd', False), ('plan per layer', 'fwd+bwd', True)]
    """
    rng = np.random.default_rng(config.seed)
    same = {k: getattr(config, k) for k in ("batch", "layers", "segments", "heads", "head_dim")}
    records: list[dict[str, Any]] = []
    for seq_len in config.seq_lens:
        ids, pos = synth.filled_segments(
            rng, batch=config.batch, seq_len=seq_len, segments=config.segments
        )
        x = rng.standard_normal((config.batch, seq_len, config.heads, config.head_dim))
        w = rng.standard_normal((config.layers, config.head_dim, config.head_dim))
        args = (
            jnp.asarray(w / np.sqrt(config.head_dim), jnp.float32),
            jnp.asarray(x, jnp.float32),
            jnp.asarray(ids),
            jnp.asarray(pos),
        )
        plans, extra = {}, {}
        for passes, variant in itertools.product(("fwd", "fwd+bwd"), VARIANTS):
            callbacks.step(f"plan T={seq_len}: compile {variant} {passes}")
            program = _program(config, variant, passes)
            plans[variant, passes] = executable, _ = measure.plan(
                program, *args, compile_timeout_s=config.compile_timeout_s
            )
            text = executable.as_text() if executable is not None else ""
            extra[variant, passes] = {
                "layout_ops_in_loop": _ops_in_loops(program, args),
                "hlo_instructions": len(re.findall(r"^\s+\S+ = ", text, re.M)) or None,
            }
        callbacks.step(f"plan T={seq_len}: timing")
        outcome = measure.run_plans(plans, args, config, config.memory_limit_bytes)
        for (variant, passes), fields in outcome.items():
            records.append(
                {"seq_len": seq_len, **same, "variant": variant, "pass": passes}
                | fields
                | extra[variant, passes]
            )
        callbacks.cell_done()
    return records


def plan_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """PLAN: layout work inside the layer loop, HLO size, compile time and latency per program."""
    columns = [
        ("T", "seq_len"), ("L", "layers"), ("variant", "variant", str, "left"),
        ("pass", "pass", str, "left"), ("layout ops in loop", "layout_ops_in_loop"),
        ("HLO instructions", "hlo_instructions"), ("compile s", "compile_s", "{:.1f}".format),
        ("temp", "temp_bytes", measure.format_bytes), ("median ms", median, "{:.1f}".format),
        ("status", lambda r: r["skip_reason"] or "", str, "left"),
    ]  # fmt: skip
    caption = (
        "layout ops in loop: cumulative max/min traced inside the scanned layers (run lengths "
        "and tile ranges); HLO instructions: the optimised program"
    )
    title = "PLAN: one plan per step vs a plan per layer (median of interleaved runs)"
    section = lambda r: (r["seq_len"], r["pass"])  # noqa: E731
    return measure.table(title, columns, records, section=section, caption=caption)
