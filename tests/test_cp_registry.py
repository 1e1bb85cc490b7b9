"""The strategy protocol: a strategy written here, registered, run and benchmarked like the
built-ins; the registry's errors; and the package's structure (one concern per module, imports
flowing downward)."""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh

import thdkit
from thdkit._src.context_parallel import traffic
from thdkit._src.context_parallel.base import Call, Shapes, Traffic
from thdkit._src.context_parallel.shards import gather_row, inverse_order, sorted_row, take_tokens
from thdkit._src.kernels.partial import attention_partial, partial_implementations
from thdkit._src.mask_types import MaskType
from thdkit._src.segments import Segments
from thdkit.bench.cp import CPBench, cp_table, run_cp_bench
from thdkit.context_parallel import (
    STRATEGIES,
    Strategy,
    StrategyConfig,
    names,
    register,
    register_strategy,
    unregister,
    unregister_strategy,
)

from .strategies import packed_row, reorder_pair
from .test_context_parallel import _collectives

PACKAGE = Path(thdkit.__file__).parent / "_src" / "context_parallel"
NAME = "gather_everything"
CP, DIM, ATOL = 4, 8, 1e-5
slow = pytest.mark.slow


# --- A strategy in a few lines: gather the whole row, attend, keep this rank's tokens ----------


def _gather_everything(config: StrategyConfig) -> Callable[..., jax.Array]:
    def local(q, k, v, q_segments: Segments, kv_segments: Segments) -> jax.Array:
        q_row, q_order = gather_row(q_segments, config)
        kv_row, kv_order = (q_row, q_order)
        if kv_segments is not q_segments:
            kv_row, kv_order = gather_row(kv_segments, config)

        def whole(x: jax.Array, order: jax.Array) -> jax.Array:
            return take_tokens(lax.all_gather(x, config.axis_name, axis=1, tiled=True), order)

        out, _ = attention_partial(
            whole(q, q_order), whole(k, kv_order), whole(v, kv_order),
            q_segments=q_row, kv_segments=kv_row, mask_type=config.mask_type,
            window_size=config.window_size, scale=config.scale,
            implementation=config.implementation,
        )  # fmt: skip
        n = q.shape[1]
        start = lax.axis_index(config.axis_name) * n
        return lax.dynamic_slice_in_dim(take_tokens(out, inverse_order(q_order)), start, n, 1)

    return local


def _gather_everything_traffic(s: Shapes, cp: int) -> Traffic:
    """q, k, v, ids and positions of the other shards; the reduce-scatters of dq, dk, dv."""
    n_q, n_kv = s.seq_q // cp, s.seq_kv // cp
    data = s.batch * (n_q * s.heads_q * s.dim + n_kv * s.heads_kv * (s.dim + s.dim_v))
    layout = s.batch * (n_q + (n_kv if s.cross else 0)) * 8
    return Traffic((cp - 1) * (data * s.itemsize + layout), (cp - 1) * data * s.itemsize, 1, 1)


def _gather_everything_work(q: Segments, kv: Segments, *, cp: int, **_: Any) -> list[list[Call]]:
    return [[Call(sorted_row(q), sorted_row(kv), 1)] for _ in range(cp)]


GATHER_EVERYTHING = Strategy(
    name=NAME,
    local=_gather_everything,
    traffic=_gather_everything_traffic,
    work=_gather_everything_work,
)


@pytest.fixture
def registered() -> Iterator[str]:
    register(GATHER_EVERYTHING)
    try:
        yield NAME
    finally:
        assert unregister(NAME) is GATHER_EVERYTHING
    assert NAME not in STRATEGIES


def _mesh(cp: int = CP) -> Mesh:
    return Mesh(np.array(jax.devices()[:cp]), ("cp",))


def _random(shape: tuple[int, ...], seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.cache
def _fn(strategy: str | None, mask_type: str, cross: bool) -> Callable[..., Any]:
    """Jitted (out, grads): ``strategy`` on the mesh, or single-device attention (None)."""

    def run(q, k, v, cotangent, ids_q, pos_q, ids_kv, pos_kv):
        def f(q, k, v):
            if strategy is None:
                kv = {"segment_ids_kv": ids_kv, "segment_pos_kv": pos_kv} if cross else {}
                return thdkit.attention(
                    q, k, v, segment_ids_q=ids_q, segment_pos_q=pos_q, **kv, mask_type=mask_type,
                    max_segments_per_seq=3, implementation="reference",
                )  # fmt: skip
            kv_segments = Segments(ids_kv, pos_kv, 0 * ids_kv) if cross else None
            return thdkit.context_parallel_attention(
                q, k, v, q_segments=Segments(ids_q, pos_q, 0 * ids_q), kv_segments=kv_segments,
                mask_type=mask_type, max_segments_per_seq=3, mesh=_mesh(), axis_name="cp",
                strategy=strategy,
            )  # fmt: skip

        out, pull = jax.vjp(f, q, k, v)
        return out, pull(cotangent)

    return jax.jit(run)


@slow
@pytest.mark.parametrize(
    ("mask_type", "cross"), [("padding_causal", False), ("padding_causal_bottom_right", True)]
)
def test_a_registered_strategy_equals_single_device_attention(registered, mask_type, cross):
    rows_q = [packed_row(32, [(12, 10), (14, 14)]), packed_row(32, [(30, 27)])]
    rows_kv = (
        [packed_row(64, [(30, 25), (20, 20)]), packed_row(64, [(64, 60)])] if cross else rows_q
    )
    ids_q, pos_q = (np.stack(side) for side in zip(*rows_q, strict=True))
    ids_kv, pos_kv = (np.stack(side) for side in zip(*rows_kv, strict=True))
    q, cotangent = (_random((2, 32, 4, DIM), seed) for seed in (0, 3))
    k, v = (_random((2, ids_kv.shape[1], 2, DIM), seed) for seed in (1, 2))
    layout = (ids_q, pos_q, ids_kv, pos_kv)
    out_ref, grads_ref = _fn(None, mask_type, cross)(q, k, v, cotangent, *layout)
    forward, inverse = reorder_pair("striped2", CP)
    out, grads = _fn(registered, mask_type, cross)(
        *(forward(x, axis=1) for x in (q, k, v, cotangent)), *(forward(x) for x in layout)
    )
    np.testing.assert_allclose(inverse(out, axis=1), out_ref, atol=ATOL, rtol=0)
    for name, grad, grad_ref in zip("qkv", grads, grads_ref, strict=True):
        np.testing.assert_allclose(
            inverse(grad, axis=1), grad_ref, atol=ATOL, rtol=0, err_msg=f"d{name}"
        )


@slow
def test_a_registered_strategy_reports_its_traffic_and_work(registered) -> None:
    """collective_bytes and the benchmark read the strategy's own formulas; the byte formula
    holds against the collectives its program traces."""
    batch, seq, heads = 1, 32, 4
    x = jnp.zeros((batch, seq, heads, DIM))
    layout = {"q_segments": Segments.from_ids(np.ones((batch, seq), np.int32))}

    def loss(q, k, v):
        return jnp.sum(
            thdkit.context_parallel_attention(
                q, k, v, **layout, max_segments_per_seq=1, mesh=_mesh(), axis_name="cp",
                strategy=registered,
            )
        )  # fmt: skip

    shapes = Shapes.of(x, x, x, cross=False)
    expected = traffic.collective_bytes(registered, shapes, cp=CP)
    assert expected == _gather_everything_traffic(shapes, CP)
    for passes, fn in (("fwd", loss), ("bwd", jax.grad(loss, (0, 1, 2)))):
        counted = sum(
            traffic.RECEIVED[name](CP) * aval.size * aval.dtype.itemsize * times
            for name, aval, times in _collectives(jax.make_jaxpr(fn)(x, x, x).jaxpr)
        )
        total = expected.forward + (expected.backward if passes == "bwd" else 0)
        assert counted == pytest.approx(total), passes
    config = CPBench(cps=(CP,), seq_len=64, segments=4, heads=4, kv_heads=4, latency=False)
    records = {r["strategy"]: r for r in run_cp_bench(config)}
    assert list(records) == list(STRATEGIES)
    mine, all_to_all = records[registered], records["all_to_all"]
    assert mine["steps_fwd"] == 1 and mine["tile_imbalance"] == 1.0
    # Every rank attends the whole row for every head: cp times all-to-all's tiles per rank.
    assert mine["tiles_max"] == CP * all_to_all["tiles_max"]


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="'ring' is registered already; pass replace=True"):
        register(STRATEGIES["ring"])
    with pytest.raises(TypeError, match="strategy must be a Strategy, got function"):
        register(_gather_everything)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"strategy\.name must be a Python identifier, got ''"):
        register(dataclasses.replace(GATHER_EVERYTHING, name=""))
    with pytest.raises(ValueError, match=f"unknown strategy '{NAME}'; valid: 'ring'"):
        unregister(NAME)
    with pytest.raises(ValueError, match=f"unknown strategy '{NAME}'"):
        traffic.collective_bytes(NAME, Shapes(1, 8, 8, 1, 1, 1, 1, 4, False), cp=2)
    ring = STRATEGIES["ring"]
    register(dataclasses.replace(ring), replace=True)  # keeps its place
    assert STRATEGIES["ring"] is not ring
    register(ring, replace=True)
    assert names() == tuple(STRATEGIES) == ("ring", "all_gather", "all_to_all")
    assert [STRATEGIES[n].name for n in names()] == list(names())


def test_the_old_spellings_warn_and_still_work() -> None:
    with pytest.warns(DeprecationWarning, match=r"thdkit.context_parallel.register\(strategy\)"):
        register_strategy("renamed", GATHER_EVERYTHING)
    assert STRATEGIES["renamed"].name == "renamed"
    with pytest.warns(DeprecationWarning, match=r"context_parallel.unregister\(name\)"):
        assert unregister_strategy("renamed").local is _gather_everything
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="registered already"):
        register_strategy("ring", STRATEGIES["ring"])
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="identifier"):
        register_strategy("gather everything", GATHER_EVERYTHING)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="unknown strategy"):
        unregister_strategy(NAME)
    assert names() == ("ring", "all_gather", "all_to_all")


def test_the_old_config_names_warn_and_read_the_renamed_fields() -> None:
    """A strategy written against the earlier names (config.mask, .window, .num_segments) still
    reads the configuration, warned, for one release."""
    config = StrategyConfig(
        mesh=_mesh(2), axis_name="cp", mask_type=MaskType.CAUSAL_BOTTOM_RIGHT,
        window_size=(5, None), max_segments_per_seq=7, scale=0.25, self_attention=False,
        implementation="blockwise",
    )  # fmt: skip
    for old, new in (
        ("mask", "mask_type"),
        ("window", "window_size"),
        ("num_segments", "max_segments_per_seq"),
    ):
        match = rf"StrategyConfig\.{old} is deprecated.*read StrategyConfig\.{new}"
        with pytest.warns(DeprecationWarning, match=match) as record:
            value = getattr(config, old)
        assert value == getattr(config, new), old
        assert record[0].filename == __file__, record[0].filename
    assert config._fields[2:5] == ("mask_type", "window_size", "max_segments_per_seq")


@slow
def test_a_strategy_without_a_cost_model_runs_and_the_bench_says_so() -> None:
    """traffic and work are the bench's cost model only: without them a strategy runs, and
    ``thdkit bench cp`` reports "no cost model" for it instead of its bytes and tiles."""
    bare = Strategy(name="bare", local=_gather_everything)
    assert bare.traffic is None and bare.work is None
    register(bare)
    try:
        ids, pos = (x[None] for x in packed_row(32, [(12, 10), (14, 14)]))
        q = _random((1, 32, 2, DIM), 0)
        out = thdkit.context_parallel_attention(
            q, q, q, q_segments=Segments.from_ids(ids, pos), max_segments_per_seq=3,
            mesh=_mesh(), axis_name="cp", strategy="bare",
        )  # fmt: skip
        expected = thdkit.attention(
            q, q, q, segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=3,
            implementation="reference",
        )  # fmt: skip
        np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)
        config = CPBench(cps=(CP,), seq_len=64, segments=4, heads=4, kv_heads=4, latency=False)
        records = {r["strategy"]: r for r in run_cp_bench(config)}
    finally:
        unregister("bare")
    mine = records["bare"]
    assert mine["skip_reason"].startswith("bare: no cost model (no traffic or work)")
    cost = ("bytes_fwd", "bytes_total", "steps_fwd", "tiles_per_rank", "tile_imbalance")
    assert all(mine[key] is None for key in cost)
    assert records["ring"]["bytes_total"] > 0 and records["ring"]["tiles_max"] > 0
    table = cp_table(list(records.values()))
    assert "bare: no cost model" in str(table.caption)


# --- Structure -----------------------------------------------------------------------------


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module) -> list[tuple[str, str]]:
    """(module, name) of every ``from thdkit.context_parallel... import name``, anywhere in the
    file (TYPE_CHECKING blocks and functions included); ``(module, "")`` for a module import."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("thdkit"):
            for alias in node.names:
                found.append((node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def _sibling(module: str, name: str) -> str | None:
    """The context_parallel module an import reads, or None for one outside the package."""
    if module == "thdkit._src.context_parallel":
        return name if (PACKAGE / f"{name}.py").exists() else "__init__"
    if module.startswith("thdkit._src.context_parallel."):
        return module.rsplit(".", 1)[1]
    return None


def _exported(tree: ast.Module) -> list[str]:
    """A module's ``__all__``."""
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return ast.literal_eval(node.value)
    raise AssertionError("no __all__")


def test_modules_are_small_and_import_downward() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for stem, tree in modules.items():
        lines = len((PACKAGE / f"{stem}.py").read_text().splitlines())
        assert lines <= 450, f"{stem}.py has {lines} lines"
        graph[stem] = set()
        for module, name in _imports(tree):
            sibling = _sibling(module, name)
            if sibling is None:
                continue
            assert stem == "__init__" or sibling != "__init__", f"{stem} imports the package"
            graph[stem].add(sibling)
            if sibling != name:  # a name taken from a sibling: public and in its __all__
                assert not name.startswith("_"), f"{stem} imports {sibling}.{name}"
                exported = _exported(modules[sibling])
                assert name in exported, f"{stem} imports {sibling}.{name}, not in its __all__"
    # No circle: repeatedly remove the modules that import no remaining module.
    remaining = {stem: deps - {stem} for stem, deps in graph.items()}
    while remaining:
        leaves = {stem for stem, deps in remaining.items() if not deps & remaining.keys()}
        assert leaves, f"import circle among {sorted(remaining)}"
        remaining = {stem: deps for stem, deps in remaining.items() if stem not in leaves}
    strategies = {"ring", "all_gather", "all_to_all"}
    for stem in strategies:
        assert graph[stem] <= {"base", "shards", "schedule"}, (stem, graph[stem])
    assert graph["base"] == set()
    assert graph["api"] <= {"base", "program", "builtins", "shards"}
    assert graph["builtins"] == strategies | {"base"}
    bench = ast.parse((PACKAGE.parent.parent / "bench" / "cp.py").read_text())
    read = {_sibling(module, name) for module, name in _imports(bench)} - {None}
    assert not read & strategies, f"the bench reads strategy modules: {read & strategies}"


def test_no_implementation_is_named_in_the_package() -> None:
    """Local implementations are validated and defaulted by attention_partial's own checks."""
    names = set(partial_implementations())
    for stem, tree in _modules().items():
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
            if isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in docstrings:
                assert node.value not in names, f"{stem}.py names {node.value!r}"


def test_a_work_with_the_old_keywords_warns_and_counts_the_same() -> None:
    """A cost model written before 0.2 (``work(..., mask, window, num_segments)``) is read by the
    bench for one more release, with a DeprecationWarning, giving the renamed one's figures."""
    ring = STRATEGIES["ring"]

    def old_work(q, kv, *, cp, mask, window, num_segments):
        return ring.work(
            q, kv, cp=cp, mask_type=mask, window_size=window, max_segments_per_seq=num_segments
        )

    config = CPBench(cps=(CP,), seq_len=64, segments=4, heads=4, kv_heads=4, latency=False)
    register(dataclasses.replace(ring, name="old_work_in_a_test", work=old_work))
    try:
        with pytest.warns(DeprecationWarning, match="'old_work_in_a_test': work.*mask_type"):
            records = {r["strategy"]: r for r in run_cp_bench(config)}
    finally:
        unregister("old_work_in_a_test")
    keys = ("tiles_max", "tile_imbalance", "steps_fwd")
    assert {k: records["old_work_in_a_test"][k] for k in keys} == {
        k: records["ring"][k] for k in keys
    }
