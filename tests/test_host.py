"""The host path: NumPy inputs give the device path's metadata bit for bit, the same
errors, and compile nothing.

Device results come from one jitted program per layout shape (every mask type, compact and raw),
so the properties cost a few compilations in all.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import thdkit
from thdkit._src import counting
from thdkit._src.host import JAX, NUMPY, on_host
from thdkit._src.mask_types import MaskType
from thdkit._src.reorder import dual_chunk_swap, ring_step, striped
from thdkit._src.synth import packed_segments

from .strategies import ALL_MASKS, batches

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
S = 6
SELF_SHAPE = (2, 2, 24)  # two batch dims
Q_SHAPE, KV_SHAPE = (2, 16), (2, 28)
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def no_device_work(*, fresh: bool = True) -> Iterator[list[str]]:
    """Fails the test if anything inside compiles an XLA program or moves data to a device.

    With ``fresh``, JAX's caches are dropped first, so even an op whose program was compiled
    before would have to compile again (the listener sees it); a host-to-device transfer
    (``jnp.asarray`` of a NumPy array) raises under the transfer guard. The properties pass
    ``fresh=False`` to keep their device programs between examples.
    """
    compiled: list[str] = []

    def listen(event: str, duration: float, **kwargs: object) -> None:
        if event == _BACKEND_COMPILE:
            compiled.append(str(kwargs.get("fun_name")))

    if fresh:
        jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        with jax.transfer_guard("disallow"):
            yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiled == [], f"the host path compiled {compiled}"


def _is_host_meta(meta: thdkit.SeqMeta, batch: tuple[int, ...]) -> bool:
    shapes = [(*batch, S), (*batch, S), (*batch, S + 1), (*batch, S + 1)]
    return all(
        type(a) is np.ndarray and a.dtype == np.int32 and a.shape == shape
        for a, shape in zip(meta, shapes, strict=True)
    )


@functools.cache
def _device_all(self_attention: bool):
    """One jitted program: the device path's metadata for every (mask type, compact)."""

    def run(ids_q, pos_q, ids_kv=None, pos_kv=None):
        kv = {} if self_attention else dict(segment_ids_kv=ids_kv, segment_pos_kv=pos_kv)
        return {
            f"{mask.value} {compact}": thdkit.seqlens_and_offsets(
                segment_ids_q=ids_q,
                segment_pos_q=pos_q,
                **kv,
                mask_type=mask,
                max_segments_per_seq=S,
                compact=compact,
            )
            for mask in ALL_MASKS
            for compact in (True, False)
        }

    return jax.jit(run)


def assert_host_equals_device(*arrays: np.ndarray) -> None:
    """Host metadata (NumPy in, NumPy out, nothing compiled) == the device path's, bit for bit."""
    device = _device_all(len(arrays) == 2)(*(jnp.asarray(a) for a in arrays))
    names = ("segment_ids_q", "segment_pos_q", "segment_ids_kv", "segment_pos_kv")
    with no_device_work(fresh=False):
        host = {
            f"{mask.value} {compact}": thdkit.seqlens_and_offsets(
                **dict(zip(names, arrays, strict=False)),
                mask_type=mask,
                max_segments_per_seq=S,
                compact=compact,
            )
            for mask in ALL_MASKS
            for compact in (True, False)
        }
    assert host.keys() == device.keys()
    for key, want in device.items():
        assert _is_host_meta(host[key], arrays[0].shape[:-1])
        for field, g, w in zip(want._fields, host[key], want, strict=True):
            np.testing.assert_array_equal(g, np.asarray(w), err_msg=f"{field} {key}")


# --- bit-equal to the device path -----------------------------------------------------------


@SETTINGS
@given(layout=batches(shape=SELF_SHAPE, max_segments=S))
def test_self_attention_equals_device(layout):
    assert_host_equals_device(*layout)


@SETTINGS
@given(q=batches(shape=Q_SHAPE, max_segments=4), kv=batches(shape=KV_SHAPE, max_segments=4))
def test_cross_attention_equals_device(q, kv):
    assert_host_equals_device(*q, *kv)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    order=st.sampled_from([("striped", 1), ("striped", 2), ("striped", 4), ("dual", 0)]),
)
def test_ring_steps_equal_device(seed, order):
    # Positions that are not affine along a run (stripes of several tokens) take the exact search.
    rng = np.random.default_rng(seed)
    ids, pos = packed_segments(rng, batch=2, seq_len=32, max_segments=4)
    kind, stripe = order
    if kind == "striped":
        ids, pos = striped(ids, cp=2, stripe_size=stripe), striped(pos, cp=2, stripe_size=stripe)
    else:
        ids, pos = dual_chunk_swap(ids, cp=2), dual_chunk_swap(pos, cp=2)
    steps = [ring_step(ids, pos, cp=2, q_rank=i, kv_rank=j) for i in range(2) for j in range(2)]
    stacked = [np.stack([np.asarray(s[k]) for s in steps]).reshape(2, 2, 2, 16) for k in range(4)]
    assert_host_equals_device(*stacked)


def test_the_exact_search_runs_on_the_host_too(monkeypatch):
    # Stripes of two tokens: the interpolation guess is wrong, so _search must run, in NumPy.
    pos = np.array([[0, 1, 4, 5, 8, 9, 12, 13]], np.int32)
    lo, hi = np.array([[0, 0, 0]], np.int32), np.array([[8, 8, 8]], np.int32)
    threshold = np.array([[2, 9, 14]], np.int32)
    calls = []
    search = counting._search
    monkeypatch.setattr(counting, "_search", lambda *a, **k: calls.append(k) or search(*a, **k))
    got = counting.first_at_least(pos, lo, hi, threshold, ops=NUMPY)
    want = counting.first_at_least(*(jnp.asarray(a) for a in (pos, lo, hi, threshold)), ops=JAX)
    assert type(got) is np.ndarray and calls and calls[0]["ops"] is NUMPY
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, [[2, 5, 8]])


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_the_shim_operations_agree(seed):
    # Indices below -M, in [-M, 0) (counted from the end), in range and past the end.
    rng, size = np.random.default_rng(seed), 4
    out = rng.integers(-5, 5, (size, 2)).astype(np.int32)
    index = rng.integers(-2 * size, 2 * size, 9).astype(np.int32)
    values = rng.integers(-9, 9, (9, 2)).astype(np.int32)
    want = JAX.scatter_max(*(jnp.asarray(a) for a in (out, index, values)))
    np.testing.assert_array_equal(NUMPY.scatter_max(out, index, values), want)
    rows = rng.integers(-9, 9, (3, 7)).astype(np.int32)
    np.testing.assert_array_equal(NUMPY.cummax(rows, 1), JAX.cummax(jnp.asarray(rows), 1))
    # Distinct slots per row, past the end too; some in-range ones written from the end.
    slots = np.stack([rng.permutation(size + 3)[:5] for _ in range(3)]).astype(np.int32)
    slots = np.where((slots < size) & (rng.random(slots.shape) < 0.5), slots - size, slots)
    place = JAX.map_rows(JAX.place)
    np.testing.assert_array_equal(
        NUMPY.place(np.full((3, size), -1, np.int32), slots, rows[:, :5]),
        place(jnp.full((3, size), -1, jnp.int32), jnp.asarray(slots), jnp.asarray(rows[:, :5])),
    )


def test_empty_batch_lists_and_wide_dtypes():
    ids, pos = [[1, 1, 2, 0]], [[0, 1, 0, 1]]
    want = thdkit.seqlens_and_offsets(
        segment_ids_q=jnp.array(ids), segment_pos_q=jnp.array(pos), max_segments_per_seq=S
    )
    with no_device_work():
        lists = thdkit.seqlens_and_offsets(
            segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=S
        )
        wide = thdkit.seqlens_and_offsets(
            segment_ids_q=np.array(ids, np.int64),
            segment_pos_q=np.array(pos, np.uint16),
            max_segments_per_seq=S,
        )
        empty = thdkit.seqlens_and_offsets(
            segment_ids_q=np.zeros((0, 3, 5), np.int32),
            segment_pos_q=np.zeros((0, 3, 5), np.int32),
            max_segments_per_seq=S,
        )
    for meta in (lists, wide):
        assert _is_host_meta(meta, (1,))
        for got, w in zip(meta, want, strict=True):
            np.testing.assert_array_equal(got, np.asarray(w))
    assert _is_host_meta(empty, (0, 3))


def test_validation_compiles_nothing():
    with no_device_work():
        thdkit.validate_layout(np.array([[1, 1, 2]]), np.array([[0, 1, 0]]), max_segments_per_seq=2)
        with pytest.raises(ValueError, match="starts a second run"):
            thdkit.validate_layout([1, 0, 1], [0, 1, 0], max_segments_per_seq=2)


def test_jax_inputs_keep_the_device_path():
    ids, pos = np.array([[1, 1, 2, 0]]), np.array([[0, 1, 0, 1]])
    assert not on_host(jnp.asarray(ids), pos) and on_host(ids, pos.tolist(), None)
    mixed = thdkit.seqlens_and_offsets(
        segment_ids_q=jnp.asarray(ids), segment_pos_q=pos, max_segments_per_seq=S
    )
    assert all(isinstance(a, jax.Array) for a in mixed)
    traced = jax.jit(
        lambda i: thdkit.seqlens_and_offsets(
            segment_ids_q=i, segment_pos_q=i, max_segments_per_seq=S
        )
    )(ids)
    assert all(isinstance(a, jax.Array) for a in traced)


@pytest.mark.parametrize("method", ["one_hot", "dense"])
def test_baseline_methods_return_numpy_for_numpy_inputs(method):
    ids, pos = np.array([[1, 1, 2, 0, 3]]), np.array([[0, 1, 0, 1, 0]])
    got = thdkit.seqlens_and_offsets(
        segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=S, method=method
    )
    want = thdkit.seqlens_and_offsets(segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=S)
    assert _is_host_meta(got, (1,))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


# --- the same errors ------------------------------------------------------------------------

_U32_BIG = 2**31 + 5
INVALID = {
    "negative id": dict(segment_ids_q=[[1, -1, 2]], segment_pos_q=[[0, 0, 0]]),
    "id above S": dict(segment_ids_q=[[1, 1, 7]], segment_pos_q=[[0, 1, 0]]),
    "padding hole": dict(segment_ids_q=[[1, 1, 0, 1]], segment_pos_q=[[0, 1, 2, 3]]),
    "ids decrease in a batch dim": dict(
        segment_ids_q=[[[1, 1, 2, 2]], [[2, 2, 1, 1]]], segment_pos_q=[[[0, 1, 0, 1]]] * 2
    ),
    "positions stall": dict(segment_ids_q=[[1, 1, 1]], segment_pos_q=[[0, 1, 1]]),
    "position above max": dict(segment_ids_q=[[1, 1]], segment_pos_q=[[0, 2**30]]),
    "kv positions fall": dict(
        segment_ids_q=[[1, 1]],
        segment_pos_q=[[0, 1]],
        segment_ids_kv=[[1, 1, 1]],
        segment_pos_kv=[[0, 2, 1]],
        mask_type="padding_causal_bottom_right",
    ),
    "uint32 id outside int32": dict(
        segment_ids_q=np.array([[1, _U32_BIG]], np.uint32), segment_pos_q=[[0, 0]]
    ),
    "uint32 position outside int32": dict(
        segment_ids_q=[[1, 1]], segment_pos_q=np.array([[0, _U32_BIG]], np.uint32)
    ),
    "shapes differ": dict(segment_ids_q=[[1, 1]], segment_pos_q=[[0, 1, 2]]),
    "scalar": dict(segment_ids_q=np.int32(1), segment_pos_q=np.int32(0)),
    "float ids": dict(segment_ids_q=np.array([[1.0, 1.0]], np.float32), segment_pos_q=[[0, 1]]),
    "batch dims differ": dict(
        segment_ids_q=[[1, 1]], segment_pos_q=[[0, 1]],
        segment_ids_kv=[[1], [1]], segment_pos_kv=[[0], [0]],
    ),
}  # fmt: skip


def _raised(call) -> BaseException:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return info.value


@pytest.mark.parametrize("case", list(INVALID))
def test_same_errors_as_the_device_path(case):
    given = dict(mask_type="causal") | INVALID[case]
    arrays = {k: v for k, v in given.items() if k.startswith("segment_")}
    options = {k: v for k, v in given.items() if not k.startswith("segment_")}
    call = functools.partial(thdkit.seqlens_and_offsets, max_segments_per_seq=S, **options)
    on_device = {k: jnp.asarray(np.asarray(v)) for k, v in arrays.items()}
    want = _raised(lambda: call(**on_device))
    with no_device_work():
        errors = [_raised(lambda: call(**{k: np.asarray(v) for k, v in arrays.items()}))]
        if all(isinstance(v, list) for v in arrays.values()):
            errors.append(_raised(lambda: call(**arrays)))
    for error in errors:
        assert (type(error), str(error)) == (type(want), str(want))


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.array([[1, 2**32 + 2]], np.int64), "id 4294967298 is outside the int32 range"),
        (np.array([[1, -(2**31) - 1]], np.int64), "id -2147483649 is outside the int32 range"),
        ([[1, 2**70]], f"id {2**70} is outside the int32 range"),
    ],
    ids=["int64 above", "int64 below", "python int beyond int64"],
)
def test_ints_outside_int32_raise_on_the_host(ids, message):
    with no_device_work(), pytest.raises(ValueError, match=re.escape(f"row 0, token 1: {message}")):
        thdkit.seqlens_and_offsets(
            segment_ids_q=ids, segment_pos_q=[[0, 0]], max_segments_per_seq=S
        )


@pytest.mark.parametrize("mask", [MaskType.PADDING, MaskType.CAUSAL])
def test_validate_layout_messages_match(mask):
    ids, pos = [[1, 1, 2], [1, 2, 1]], [[0, 1, 0], [0, 0, 0]]
    call = functools.partial(thdkit.validate_layout, max_segments_per_seq=2, mask_type=mask)
    want = _raised(lambda: call(jnp.array(ids), jnp.array(pos), name="segment_ids_kv"))
    with no_device_work():
        got = _raised(lambda: call(np.array(ids), pos, name="segment_ids_kv"))
    assert (type(got), str(got)) == (type(want), str(want))
    assert "segment_ids_kv row 1, token 2" in str(got)


def _programs_compiled(fn) -> list[str]:
    """The names of the XLA programs ``fn()`` compiles, JAX's caches dropped first."""
    compiled: list[str] = []

    def listen(event: str, duration: float, **kwargs: object) -> None:
        if event == _BACKEND_COMPILE:
            compiled.append(str(kwargs.get("fun_name")))

    jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return compiled


@pytest.mark.parametrize("concrete", [False, True], ids=["numpy", "jax"])
def test_plans_and_eager_attention_prepare_host_layouts_on_the_host(concrete):
    """A plan of host (or concrete) Segments compiles nothing and holds device arrays; the keyword
    form of attention compiles only the forward; both equal the traced path."""
    ids, pos = packed_segments(np.random.default_rng(3), batch=2, seq_len=24, max_segments=S)
    ids, pos = (jnp.asarray(ids), jnp.asarray(pos)) if concrete else (ids, pos)
    x = jax.device_put(np.random.default_rng(4).standard_normal((2, 24, 2, 8)).astype(np.float32))
    options = dict(max_segments_per_seq=S, implementation="blockwise")
    segments = thdkit.Segments.from_ids(ids, pos)
    plans: list[thdkit.AttentionPlan] = []
    planned = lambda: plans.append(thdkit.plan_attention(segments, mask_type="causal", **options))  # noqa: E731
    assert _programs_compiled(planned) == []
    (plan,) = plans
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(plan.aux))
    keywords = dict(segment_ids_q=ids, segment_pos_q=pos, mask_type="causal", **options)
    eager = lambda: thdkit.attention(x, x, x, **keywords)  # noqa: E731
    assert _programs_compiled(eager) == ["jit(_forward)"]

    @jax.jit
    def traced(x, ids, pos):
        seg = thdkit.Segments.from_ids(ids, pos)
        traced_plan = thdkit.plan_attention(seg, mask_type="causal", **options)
        np.testing.assert_equal(type(traced_plan.aux["blockwise"].lo), type(x))  # a tracer
        return traced_plan.aux["blockwise"], thdkit.attention(x, x, x, plan=traced_plan)

    ranges, expected = traced(x, jnp.asarray(ids), jnp.asarray(pos))
    np.testing.assert_array_equal(plan.aux["blockwise"].lo, ranges.lo)
    np.testing.assert_array_equal(plan.aux["blockwise"].hi, ranges.hi)
    np.testing.assert_allclose(eager(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(thdkit.attention(x, x, x, plan=plan), expected, rtol=1e-6, atol=1e-6)
