"""Context-parallel reorders, their inverses, ring-step views, and their argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import thdkit
from thdkit._src.reorder import (
    dual_chunk_swap,
    ring_step,
    shard,
    striped,
    undo_dual_chunk_swap,
    unstriped,
)
from thdkit._src.synth import packed_segments


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("stripe", [1, 2, 4])
def test_striped_round_trip_and_ownership(cp, stripe):
    x = np.arange(2 * 32).reshape(2, 32)
    y = striped(x, cp=cp, stripe_size=stripe)
    np.testing.assert_array_equal(unstriped(y, cp=cp, stripe_size=stripe), x)
    for rank in range(cp):
        owned = shard(y, cp=cp, rank=rank)[0]
        assert np.all((owned // stripe) % cp == rank)
        assert np.all(np.diff(owned) > 0)
    # Works for JAX arrays and any axis too.
    z = striped(jnp.asarray(x.T), cp=cp, stripe_size=stripe, axis=0)
    np.testing.assert_array_equal(z, y.T)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_dual_chunk_swap_round_trip_and_ownership(cp):
    x = np.arange(16 * cp)
    y = dual_chunk_swap(x, cp=cp)
    np.testing.assert_array_equal(undo_dual_chunk_swap(y, cp=cp), x)
    chunk = len(x) // (2 * cp)
    for rank in range(cp):
        chunks = set(shard(y, cp=cp, rank=rank) // chunk)
        assert chunks == {rank, 2 * cp - 1 - rank}


def test_reorder_argument_errors():
    with pytest.raises(ValueError, match=r"multiple of 8, got T=12"):
        striped(np.arange(12), cp=4, stripe_size=2)
    with pytest.raises(ValueError, match=r"multiple of 8, got T=12"):
        dual_chunk_swap(np.arange(12), cp=4)
    with pytest.raises(ValueError, match="rank must be in"):
        shard(np.arange(8), cp=2, rank=2)


@pytest.mark.parametrize(
    ("reorder", "cp"),
    [
        (lambda x: striped(x, cp=4), 4),
        (lambda x: striped(x, cp=2, stripe_size=4), 2),
        (lambda x: dual_chunk_swap(x, cp=4), 4),
    ],
)
def test_ring_steps_of_reordered_layouts_are_valid(reorder, cp):
    ids, pos = packed_segments(np.random.default_rng(5), batch=3, seq_len=64, max_segments=5)
    ids, pos = reorder(ids), reorder(pos)
    for i in range(cp):
        for j in range(cp):
            ids_q, pos_q, ids_kv, pos_kv = ring_step(ids, pos, cp=cp, q_rank=i, kv_rank=j)
            assert ids_q.shape == (3, 64 // cp)
            thdkit.validate_layout(ids_q, pos_q, max_segments_per_seq=5, mask_type="causal")
            thdkit.validate_layout(ids_kv, pos_kv, max_segments_per_seq=5, mask_type="causal")


def test_numpy_int_arguments_do_not_depend_on_the_cache():
    """np.int64 arguments work on a cache miss (each T below is new to this process)."""
    x = np.arange(40)
    fresh = striped(x, cp=np.int64(4), stripe_size=np.int32(2))
    np.testing.assert_array_equal(fresh, striped(x, cp=4, stripe_size=2))
    np.testing.assert_array_equal(unstriped(fresh, cp=np.int8(4), stripe_size=2), x)
    y = np.arange(44)
    np.testing.assert_array_equal(dual_chunk_swap(y, cp=np.int64(2)), dual_chunk_swap(y, cp=2))
    np.testing.assert_array_equal(shard(y, cp=np.int64(4), rank=np.int64(3)), y[33:])
    # And a cached call does not make a bad argument pass.
    striped(np.arange(48), cp=4)
    with pytest.raises(TypeError, match="cp must be an int, got float"):
        striped(np.arange(48), cp=4.0)


_X = np.arange(8)

# (function, x, keyword arguments, error, message)
ARGUMENT_ERRORS = {
    "cp bool": (striped, _X, dict(cp=True), TypeError, r"cp must be an int, got bool"),
    "cp numpy bool": (
        dual_chunk_swap,
        _X,
        dict(cp=np.bool_(True)),
        TypeError,
        r"cp must be an int, got bool",
    ),
    "cp float": (unstriped, _X, dict(cp=2.0), TypeError, r"cp must be an int, got float"),
    "cp zero": (striped, _X, dict(cp=0), ValueError, r"cp must be >= 1, got 0"),
    "cp negative": (undo_dual_chunk_swap, _X, dict(cp=-2), ValueError, r"cp must be >= 1, got -2"),
    "stripe bool": (
        striped,
        _X,
        dict(cp=2, stripe_size=True),
        TypeError,
        r"stripe_size must be an int, got bool",
    ),
    "stripe float": (
        unstriped,
        _X,
        dict(cp=2, stripe_size=1.5),
        TypeError,
        r"stripe_size must be an int, got float",
    ),
    "stripe zero": (
        striped,
        _X,
        dict(cp=2, stripe_size=0),
        ValueError,
        r"stripe_size must be >= 1, got 0",
    ),
    "axis out of range": (
        striped,
        _X,
        dict(cp=2, axis=5),
        ValueError,
        r"axis must be in \[-1, 0\], got 5",
    ),
    "axis negative": (
        dual_chunk_swap,
        np.zeros((2, 8)),
        dict(cp=2, axis=-3),
        ValueError,
        r"axis must be in \[-2, 1\], got -3",
    ),
    "axis float": (
        shard,
        _X,
        dict(cp=2, rank=0, axis=0.0),
        TypeError,
        r"axis must be an int, got float",
    ),
    "0-d input": (
        striped,
        np.array(3),
        dict(cp=1),
        ValueError,
        r"x must have a sequence axis, got a 0-d array",
    ),
    "0-d jax input": (
        shard,
        jnp.array(3),
        dict(cp=1, rank=0),
        ValueError,
        r"x must have a sequence axis",
    ),
    "rank float": (shard, _X, dict(cp=2, rank=1.5), TypeError, r"rank must be an int, got float"),
    "rank bool": (shard, _X, dict(cp=2, rank=True), TypeError, r"rank must be an int, got bool"),
    "rank negative": (
        shard,
        _X,
        dict(cp=2, rank=-1),
        ValueError,
        r"rank must be in \[0, 1\], got -1",
    ),
    "rank too big": (shard, _X, dict(cp=2, rank=2), ValueError, r"rank must be in \[0, 1\], got 2"),
    "not a multiple": (
        shard,
        np.arange(9),
        dict(cp=2, rank=0),
        ValueError,
        r"shard\(cp=2\) needs the sequence length to be a multiple of 2, got T=9",
    ),
}


@pytest.mark.parametrize("case", list(ARGUMENT_ERRORS))
def test_argument_errors_name_the_parameter(case):
    function, x, kwargs, error, pattern = ARGUMENT_ERRORS[case]
    with pytest.raises(error, match=pattern):
        function(x, **kwargs)


@pytest.mark.parametrize(
    ("ranks", "error", "pattern"),
    [
        (dict(q_rank=2, kv_rank=0), ValueError, r"q_rank must be in \[0, 1\], got 2"),
        (dict(q_rank=0, kv_rank=0.5), TypeError, r"kv_rank must be an int, got float"),
    ],
)
def test_ring_step_names_the_rank(ranks, error, pattern):
    with pytest.raises(error, match=pattern):
        ring_step(np.ones(8), np.ones(8), cp=2, **ranks)


def test_lists_are_read_as_numpy_arrays():
    out = striped([[0, 1, 2, 3], [4, 5, 6, 7]], cp=2)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, [[0, 2, 1, 3], [4, 6, 5, 7]])
    np.testing.assert_array_equal(shard([0, 1, 2, 3], cp=2, rank=1), [2, 3])
    ids_q, *_ = ring_step([1, 1, 2, 2], [0, 1, 0, 1], cp=2, q_rank=1, kv_rank=0)
    np.testing.assert_array_equal(ids_q, [2, 2])


def test_reorders_under_jit():
    x = jnp.arange(16).reshape(2, 8)
    fn = jax.jit(lambda a: unstriped(striped(a, cp=2, stripe_size=2), cp=2, stripe_size=2))
    np.testing.assert_array_equal(fn(x), x)
