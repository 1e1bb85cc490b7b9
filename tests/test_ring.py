"""Ring attention against the single-device reference, on 4 and 8 simulated CPU devices."""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from thdkit._src import reorder, synth
from thdkit._src.context_parallel import ring
from thdkit._src.mask_types import MaskType
from thdkit._src.masks import pair_mask
from thdkit._src.segments import Segments, run_lengths
from thdkit.bench import ring as ring_bench
from thdkit.context_parallel import ring_attention, ring_schedule
from thdkit.kernels import attention

from .strategies import packed_row, reorder_pair

HEADS, DIM = 2, 8
NUM_SEGMENTS = 4
ATOL = 1e-5
slow = pytest.mark.slow  # runs ring attention on a simulated multi-device mesh

# name -> (mask_type, window_size)
CASES = {
    "padding": ("padding", None),
    "causal": ("padding_causal", None),
    "bottom_right": ("padding_causal_bottom_right", None),
    "causal_window": ("padding_causal", (7, 0)),
    "padding_window": ("padding", (6, 3)),
    "bottom_right_window": ("padding_causal_bottom_right", (9, None)),
}
# Each case compiles once for all reorders; the window cases run on 8 devices (more steps).
GRID = [
    (4, "padding"),
    (4, "causal"),
    (4, "bottom_right"),
    (4, "causal_window"),
    (8, "padding_window"),
    (8, "bottom_right_window"),
]
REORDERS = ("none", "striped1", "striped2", "dual_chunk_swap")


def _layout(seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows: one long document with tail padding; four documents and trailing padding."""
    unit = seq_len // 64
    four = [(13, 10), (9, 9), (22, 18), (11, 11)]
    rows = [
        packed_row(seq_len, [(61 * unit, 58 * unit)]),
        packed_row(seq_len, [(n * unit, d * unit) for n, d in four]),
    ]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def _mesh(cp: int) -> Mesh:
    if jax.device_count() < cp:
        pytest.skip(f"needs {cp} devices")
    return Mesh(np.array(jax.devices()[:cp]), ("cp",))


def _random(shape: tuple[int, ...], seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rows(ids: Any, pos: Any) -> Segments:
    """The Segments of rows as the ring takes them (any token order; lengths are not read)."""
    return Segments(ids, pos, 0 * ids)


@functools.cache
def _reference_fn(mask_type: str, window: Any) -> Callable[..., Any]:
    """Jitted (out, grads) of the dense single-device attention; ids are traced."""

    def run(q, k, v, cotangent, ids_q, pos_q, ids_kv, pos_kv):
        def f(q, k, v):
            return attention(
                q, k, v, segment_ids_q=ids_q, segment_pos_q=pos_q, segment_ids_kv=ids_kv,
                segment_pos_kv=pos_kv, mask_type=mask_type, window_size=window,
                max_segments_per_seq=NUM_SEGMENTS, implementation="reference",
            )  # fmt: skip

        out, pull = jax.vjp(f, q, k, v)
        return out, pull(cotangent)

    return jax.jit(run)


@functools.cache
def _ring_fn(mesh: Mesh, mask_type: str, window: Any, self_attention: bool) -> Callable[..., Any]:
    """Jitted (out, grads) of ring attention on reordered inputs; ids are traced, so every
    reorder of one shape reuses one compilation."""

    def run(q, k, v, cotangent, ids_q, pos_q, ids_kv, pos_kv):
        kv_segments = None if self_attention else _rows(ids_kv, pos_kv)

        def f(q, k, v):
            return ring_attention(
                q, k, v, q_segments=_rows(ids_q, pos_q), kv_segments=kv_segments,
                mask_type=mask_type, window_size=window, max_segments_per_seq=NUM_SEGMENTS,
                mesh=mesh, axis_name="cp",
            )  # fmt: skip

        out, pull = jax.vjp(f, q, k, v)
        return out, pull(cotangent)

    return jax.jit(run)


def _check_against_reference(
    mesh: Mesh,
    reorder_name: str,
    mask_type: str,
    window: Any,
    q_layout: tuple[np.ndarray, np.ndarray],
    kv_layout: tuple[np.ndarray, np.ndarray] | None,
    heads_kv: int = HEADS,
) -> None:
    """Runs ring attention on reordered inputs and compares output and gradients, unreordered."""
    cp = mesh.shape["cp"]
    forward, inverse = reorder_pair(reorder_name, cp)
    self_attention = kv_layout is None
    ids_q, pos_q = q_layout
    ids_kv, pos_kv = q_layout if self_attention else kv_layout
    batch, seq_q = ids_q.shape
    seq_kv = ids_kv.shape[1]
    q, cotangent = (_random((batch, seq_q, HEADS, DIM), seed) for seed in (0, 3))
    k, v = (_random((batch, seq_kv, heads_kv, DIM), seed) for seed in (1, 2))

    out_ref, grads_ref = _reference_fn(mask_type, window)(
        q, k, v, cotangent, ids_q, pos_q, ids_kv, pos_kv
    )
    tokens = functools.partial(forward, axis=1)
    out, grads = _ring_fn(mesh, mask_type, window, self_attention)(
        *(tokens(x) for x in (q, k, v, cotangent)),
        *(forward(x) for x in (ids_q, pos_q, ids_kv, pos_kv)),
    )
    np.testing.assert_allclose(inverse(out, axis=1), out_ref, atol=ATOL, rtol=0)
    for name, grad, grad_ref in zip("qkv", grads, grads_ref, strict=True):
        np.testing.assert_allclose(
            inverse(grad, axis=1), grad_ref, atol=ATOL, rtol=0, err_msg=f"d{name}"
        )


@slow
@pytest.mark.parametrize("reorder_name", REORDERS)
@pytest.mark.parametrize(("cp", "case"), GRID)
def test_matches_reference(cp: int, case: str, reorder_name: str) -> None:
    mask_type, window = CASES[case]
    seq_len = 16 * cp
    _check_against_reference(_mesh(cp), reorder_name, mask_type, window, _layout(seq_len), None)


@slow
@pytest.mark.parametrize("reorder_name", ["none", "striped1"])
def test_cross_attention_bottom_right_gqa(reorder_name: str) -> None:
    # kv documents longer than the q ones: bottom-right reads the global document lengths.
    q_rows = [packed_row(64, [(30, 26), (20, 20)]), packed_row(64, [(64, 64)])]
    kv_rows = [packed_row(128, [(60, 55), (44, 40)]), packed_row(128, [(100, 100)])]
    q_layout = tuple(np.stack(side) for side in zip(*q_rows, strict=True))
    kv_layout = tuple(np.stack(side) for side in zip(*kv_rows, strict=True))
    _check_against_reference(
        _mesh(4), reorder_name, "padding_causal_bottom_right", (20, None), q_layout, kv_layout,
        heads_kv=1,
    )  # fmt: skip


@slow
def test_batch_sharded_on_second_mesh_axis() -> None:
    # A 2 x 2 mesh: 8 simulated devices on a 2-core machine once aborted XLA:CPU under load
    # (jax 0.10.2), and four show the same thing, a batch axis beside the ring's.
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "cp"))
    forward, inverse = reorder_pair("striped1", 2)
    ids, pos = _layout(64)
    q, k, v, cotangent = (_random((2, 64, HEADS, DIM), seed) for seed in range(4))
    out_ref, grads_ref = _reference_fn("padding_causal", None)(
        q, k, v, cotangent, ids, pos, ids, pos
    )
    heads = NamedSharding(mesh, P("data", "cp", None, None))
    tokens = NamedSharding(mesh, P("data", "cp"))
    arrays = [jax.device_put(forward(x, axis=1), heads) for x in (q, k, v, cotangent)]
    layout = [jax.device_put(forward(x), tokens) for x in (ids, pos)]
    run = _ring_fn(mesh, "padding_causal", None, True)
    out, grads = run(*arrays, *layout, *layout)
    # Each device holds one row and half of the tokens: the batch stayed split.
    assert {s.data.shape for s in out.addressable_shards} == {(1, 32, HEADS, DIM)}
    # Compared on the host, once the program has finished.
    out, grads = jax.block_until_ready((out, grads))
    np.testing.assert_allclose(inverse(np.asarray(out), axis=1), out_ref, atol=ATOL, rtol=0)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(inverse(np.asarray(grad), axis=1), grad_ref, atol=ATOL, rtol=0)


_pair_mask = jax.jit(pair_mask, static_argnames=("mask_type", "window_size"))


def _brute_force_pairs(
    ids: np.ndarray, pos: np.ndarray, *, cp: int, mask_type: str, window: Any, order: str
) -> np.ndarray:
    """int[B, cp, cp]: allowed pairs of ring step (rank, step), from the dense pair_mask."""
    forward, _ = reorder_pair(order, cp)
    lengths = run_lengths(jnp.asarray(ids))  # whole documents, before reordering
    ids, pos, lengths = (np.asarray(forward(np.asarray(x))) for x in (ids, pos, lengths))
    mask = MaskType.parse(mask_type)
    result = np.zeros((ids.shape[0], cp, cp), np.int64)
    for rank in range(cp):
        for step in range(cp):
            source = (rank - step) % cp
            q = [reorder.shard(x, cp=cp, rank=rank) for x in (ids, pos, lengths)]
            kv = [reorder.shard(x, cp=cp, rank=source) for x in (ids, pos, lengths)]
            allowed = _pair_mask(Segments(*q), Segments(*kv), mask_type=mask, window_size=window)
            result[:, rank, step] = np.asarray(allowed).sum(axis=(-1, -2))
    return result


@pytest.mark.parametrize("order", REORDERS)
def test_schedule_matches_brute_force(order: str) -> None:
    ids, pos = _layout(64)
    for mask_type, window in CASES.values():
        forward, _ = reorder_pair(order, 4)
        runs = np.asarray(
            ring_schedule(
                q_segments=_rows(forward(ids), forward(pos)), cp=4, mask_type=mask_type,
                window_size=window, max_segments_per_seq=NUM_SEGMENTS,
            )
        )  # fmt: skip
        pairs = _brute_force_pairs(ids, pos, cp=4, mask_type=mask_type, window=window, order=order)
        needed = pairs > 0
        assert not (needed & ~runs).any(), "a step with work was skipped"
        if window is None:  # exact without a window
            np.testing.assert_array_equal(runs, needed)


def test_schedule_one_document() -> None:
    ids, pos = np.ones((1, 64), np.int32), np.arange(64, dtype=np.int32)[None]
    plain = ring_schedule(q_segments=_rows(ids, pos), cp=4, max_segments_per_seq=1)[0]
    np.testing.assert_array_equal(plain, np.tril(np.ones((4, 4), bool)))
    for order in ("striped1", "striped2", "dual_chunk_swap"):
        forward, _ = reorder_pair(order, 4)
        segments = _rows(forward(ids), forward(pos))
        assert ring_schedule(q_segments=segments, cp=4, max_segments_per_seq=1).all()
    # With a short window, a rank needs only its own keys (step 0) and its left neighbour's
    # (step 1); rank 0 has no left neighbour.
    windowed = ring_schedule(
        q_segments=_rows(ids, pos), cp=4, window_size=(3, 0), max_segments_per_seq=1
    )[0]
    expected = np.zeros((4, 4), bool)
    expected[:, 0] = expected[1:, 1] = True
    np.testing.assert_array_equal(windowed, expected)


@slow
def test_skipped_steps_are_not_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = ring.attention_partial

    def counted(*args: Any, **kwargs: Any) -> Any:
        jax.debug.callback(lambda rank: calls.append(int(rank)), jax.lax.axis_index("cp"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ring, "attention_partial", counted)
    ids, pos = np.ones((1, 64), np.int32), np.arange(64, dtype=np.int32)[None]
    x = _random((1, 64, HEADS, DIM), 0)
    # A scale used nowhere else gives a configuration traced afresh, with the counting partial.
    out = ring_attention(
        x, x, x, q_segments=_rows(ids, pos), max_segments_per_seq=1, mesh=_mesh(4),
        axis_name="cp", scale=0.3125,
    )  # fmt: skip
    jax.block_until_ready(out)
    jax.effects_barrier()
    # Plain order, one causal document: rank r attends to ranks 0..r only.
    assert collections.Counter(calls) == {0: 1, 1: 2, 2: 3, 3: 4}


@slow
@pytest.mark.parametrize(("lengths", "moved"), [((16, 16, 16, 16), False), ((24, 8, 16, 16), True)])
def test_the_ring_stops_after_the_last_step_with_work(
    monkeypatch: pytest.MonkeyPatch, lengths: tuple[int, ...], moved: bool
) -> None:
    """Documents that each lie inside one rank's shard move no key, value or gradient, forward
    or backward; one document across a boundary makes the keys move. Outputs and gradients equal
    one device's either way."""
    moves: list[int] = []
    real = jax.lax.ppermute

    def counted(x: Any, axis_name: Any, perm: Any) -> Any:
        jax.debug.callback(lambda: moves.append(1))
        return real(x, axis_name, perm)

    monkeypatch.setattr(ring.lax, "ppermute", counted)
    ids, pos = packed_row(64, [(n, n) for n in lengths])
    ids, pos = ids[None], pos[None]
    x, w = _random((1, 64, HEADS, DIM), 1), _random((1, 64, HEADS, DIM), 2)
    # A scale used nowhere else (one per case) gives a program traced afresh, with the counting
    # ppermute and this case's list.
    options = dict(max_segments_per_seq=4, scale=0.3129 if moved else 0.3127)

    def parallel(q, k, v):
        out = ring_attention(
            q, k, v, q_segments=_rows(ids, pos), mesh=_mesh(4), axis_name="cp", **options
        )
        return jnp.sum(out * w)

    def single(q, k, v):
        out = attention(q, k, v, segment_ids_q=ids, segment_pos_q=pos, **options)
        return jnp.sum(out * w)

    got = jax.value_and_grad(parallel, (0, 1, 2))(x, x, x)
    jax.block_until_ready(got)
    jax.effects_barrier()
    assert bool(moves) == moved
    want = jax.value_and_grad(single, (0, 1, 2))(x, x, x)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, h, atol=ATOL, rtol=ATOL)


@slow
def test_eager_call_and_zero_rows() -> None:
    # An all-padding row gives zeros; the eager path validates and runs the cached program.
    ids = np.stack([packed_row(32, [(20, 20)])[0], np.zeros(32, np.int32)])
    pos = np.stack([packed_row(32, [(20, 20)])[1], np.zeros(32, np.int32)])
    x = _random((2, 32, HEADS, DIM), 0)
    out = ring_attention(
        x, x, x, q_segments=Segments.from_ids(ids, pos), max_segments_per_seq=1, mesh=_mesh(4),
        axis_name="cp",
    )  # fmt: skip
    ref = attention(
        x, x, x, segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=1,
        implementation="reference",
    )  # fmt: skip
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
    assert not np.asarray(out[1]).any()


def _one_document(seq_len: int) -> Segments:
    return Segments.from_ids(np.ones((1, seq_len), np.int32))


def _call(**overrides: Any) -> Any:
    args = {
        "query": jnp.zeros((1, 16, 2, 4)),
        "key": jnp.zeros((1, 16, 2, 4)),
        "value": jnp.zeros((1, 16, 2, 4)),
        "q_segments": _one_document(16),
        "max_segments_per_seq": 1,
        "mesh": _mesh(4),
        "axis_name": "cp",
    } | overrides
    return ring_attention(args.pop("query"), args.pop("key"), args.pop("value"), **args)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"axis_name": "sp"}, ValueError, "axis_name 'sp' is not an axis of the mesh"),
        ({"mesh": "cp"}, TypeError, "mesh must be a jax.sharding.Mesh"),
        (
            {
                "query": jnp.zeros((1, 18, 2, 4)),
                "key": jnp.zeros((1, 18, 2, 4)),
                "value": jnp.zeros((1, 18, 2, 4)),
                "q_segments": _one_document(18),
            },
            ValueError,
            "cp=4.*must divide.*T=18",
        ),
        (
            {"q_segments": _one_document(8)},
            ValueError,
            re.escape("q_segments must have [B, T] fields of shape (1, 16) to match query"),
        ),
        ({"query": jnp.zeros((16, 2, 4))}, ValueError, "query must have rank 4"),
        (
            {"key": jnp.zeros((1, 16, 3, 4)), "value": jnp.zeros((1, 16, 3, 4))},
            ValueError,
            "query heads H_q=2 must be a multiple of the key/value heads H_kv=3",
        ),
        ({"kv_segments": np.ones((1, 16), np.int32)}, TypeError, "kv_segments must be a thdkit"),
        ({"window_size": (3,)}, ValueError, "window_size must be None or a pair"),
        (
            {"q_segments": _rows(np.array([[1, 1, 0, 1] * 4]), np.arange(16)[None])},
            ValueError,
            r"q_segments row \(0, 0\), token 3: .*second run.*shard",
        ),
        (
            {"q_segments": _rows(np.ones((1, 16), int), np.array([[0, 2, 1, 3] * 4]))},
            ValueError,
            r"q_segments positions row \(0, 0\), token 2",
        ),
        (
            {"query": jnp.zeros((1, 16, 2, 4), jnp.int32)},
            TypeError,
            "query must be float32, bfloat16 or float16",
        ),
    ],
)
def test_invalid_arguments(overrides: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _call(**overrides)


@slow
def test_docs_example_runs() -> None:
    text = (Path(__file__).parents[1] / "docs" / "context-parallel.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "docs/context-parallel.md has no python example"
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    for block in blocks:
        exec(compile(block, "docs/context-parallel.md", "exec"), namespace)


@slow
def test_bench_work_counts_and_records() -> None:
    ids, pos = synth.filled_segments(np.random.default_rng(1), batch=2, seq_len=64, segments=5)
    for order in ("none", "striped2"):
        forward, _ = reorder_pair(order, 4)
        for mask_type, window in CASES.values():
            work = ring_bench.work_per_rank(
                forward(ids), forward(pos), cp=4, mask_type=mask_type, window_size=window
            )
            expected = _brute_force_pairs(
                ids, pos, cp=4, mask_type=mask_type, window=window, order=order
            ).sum(axis=0)
            np.testing.assert_array_equal(work, expected, err_msg=f"{order} {mask_type} {window}")

    config = ring_bench.RingBench(
        cp=4, seq_len=64, segments=(1, 4), stripe_sizes=(1, 2), heads=1, head_dim=8, repeats=1,
        warmup=0, time_per_program_s=0.01,
    )  # fmt: skip
    records = ring_bench.run_ring_bench(config)
    assert [(r["segments"], r["reorder"]) for r in records] == [
        (s, name) for s in (1, 4) for name in ring_bench.reorder_names((1, 2))
    ]
    plain = records[0]
    # One causal document, plain order: rank r needs steps 0..r, so 6 of 16 are skipped and the
    # last rank does most of the work.
    assert plain["steps_skipped"] == plain["steps_empty"] == 6
    assert plain["imbalance"] > 1.7
    assert all(r["latency_ms"]["samples"] >= 1 for r in records)
    assert ring_bench.ring_table(records).row_count == len(records)


@slow
@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize("mask_type", ["padding_causal", "padding_causal_bottom_right"])
def test_a_non_finite_document_stays_inside_it(mask_type: str, poison: float) -> None:
    """Poisoning document 2's keys and values leaves every other row's output and gradients
    bit-equal, through the ring's forward merge and its backward ring."""
    cp, seq_len = 4, 64
    ids, pos = packed_row(seq_len, [(20, 20), (24, 20), (16, 16)])
    ids, pos = ids[None], pos[None]
    forward, _ = reorder_pair("striped2", cp)
    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, seq_len, HEADS, DIM)), jnp.float32) for _ in "qkv")
    doc = jnp.asarray(ids == 2)[..., None, None]
    others = forward(jnp.asarray(ids != 2), axis=-1)[..., None, None]

    def run(k, v):
        def loss(q, k, v):
            out = ring_attention(
                *(forward(x, axis=1) for x in (q, k, v)),
                q_segments=_rows(forward(ids), forward(pos)), mask_type=mask_type,
                max_segments_per_seq=NUM_SEGMENTS, mesh=mesh, axis_name="cp",
            )  # fmt: skip
            return jnp.sum(jnp.where(others, out, 0.0) ** 2), out

        (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    clean_out, clean_grads = run(k, v)
    out, grads = run(jnp.where(doc, poison, k), jnp.where(doc, poison, v))
    keep = np.asarray(others[0, :, 0, 0])
    np.testing.assert_array_equal(out[:, keep], clean_out[:, keep])
    assert np.isnan(np.asarray(out[:, ~keep & (forward(ids)[0] == 2)])).all()
    rows = np.asarray(ids[0] != 2)
    for grad, clean in zip(grads, clean_grads, strict=True):
        np.testing.assert_array_equal(grad[:, rows], clean[:, rows])
