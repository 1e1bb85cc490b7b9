"""Segments as the layout of the context-parallel entry points and of ``ring_schedule``; the
deprecated keyword arrays: the same results, a DeprecationWarning pointing at the call, never
mixed with Segments, and messages naming the arrays passed."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import thdkit
from thdkit import Segments
from thdkit._src.reorder import striped

from .strategies import packed_row

CP = 4
slow = pytest.mark.slow


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:CP]), ("cp",))


def _random(shape: tuple[int, ...], seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _striped(segments: Segments) -> Segments:
    return jax.tree.map(lambda a: striped(a, cp=CP), segments)


# Two rows of 32 query tokens, 64 key tokens (cross-attention, bottom-right reads the lengths).
Q_ROWS = [packed_row(32, [(14, 12), (10, 10)]), packed_row(32, [(32, 30)])]
KV_ROWS = [packed_row(64, [(30, 27), (20, 20)]), packed_row(64, [(60, 60)])]
IDS_Q, POS_Q = (np.stack(side) for side in zip(*Q_ROWS, strict=True))
IDS_KV, POS_KV = (np.stack(side) for side in zip(*KV_ROWS, strict=True))


DEPRECATED = r"\(segment_ids_q, segment_pos_q.*\) is deprecated.*pass q_segments=thdkit\.Segments"


@contextlib.contextmanager
def _deprecated(caller: str, match: str = DEPRECATED) -> Iterator[None]:
    """Checks that the block warns once (DeprecationWarning) about the layout arrays given to
    ``caller``, pointing at this file's call; an error the block raises is checked inside it."""
    with pytest.warns(DeprecationWarning, match=f"{caller}{match}") as record:
        yield
    ours = [w for w in record if issubclass(w.category, DeprecationWarning)]
    assert len(ours) == 1 and ours[0].filename == __file__, [str(w.message) for w in ours]


@slow
@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_the_deprecated_arrays_give_what_segments_give(strategy: str) -> None:
    """Segments of the whole rows, reordered with the tokens, run the same program as the
    deprecated keyword arrays (which warn); their lengths are recomputed, so a reorder that moved
    them (or garbage) changes nothing."""
    q = _random((2, 32, 2, 8), 0)
    k, v = (_random((2, 64, 2, 8), seed) for seed in (1, 2))
    tokens = [striped(x, cp=CP, axis=1) for x in (q, k, v)]
    options = dict(
        mask_type="padding_causal_bottom_right", max_segments_per_seq=2, mesh=_mesh(),
        axis_name="cp", strategy=strategy,
    )  # fmt: skip
    q_segments = _striped(Segments.from_ids(IDS_Q, POS_Q))
    kv_segments = _striped(Segments.from_ids(IDS_KV, POS_KV))
    expected = thdkit.context_parallel_attention(
        *tokens, q_segments=q_segments, kv_segments=kv_segments, **options
    )
    stale = Segments(kv_segments.ids, kv_segments.positions, kv_segments.ids)
    out = thdkit.context_parallel_attention(
        *tokens, q_segments=q_segments, kv_segments=stale, **options
    )
    np.testing.assert_array_equal(out, expected)
    every = r"\(segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv\) is deprecated"
    with _deprecated("context_parallel_attention", every + r".*kv_segments=thdkit\.Segments"):
        out = thdkit.context_parallel_attention(
            *tokens, segment_ids_q=q_segments.ids, segment_pos_q=q_segments.positions,
            segment_ids_kv=kv_segments.ids, segment_pos_kv=kv_segments.positions, **options,
        )  # fmt: skip
    np.testing.assert_array_equal(out, expected)


@slow
def test_ring_attention_takes_segments_under_jit_and_the_arrays_warn() -> None:
    x = _random((2, 32, 2, 8), 0)
    segments = _striped(Segments.from_ids(IDS_Q, POS_Q))
    options = dict(max_segments_per_seq=2, mesh=_mesh(), axis_name="cp")
    run = jax.jit(lambda x, s: thdkit.ring_attention(x, x, x, q_segments=s, **options))
    expected = thdkit.ring_attention(x, x, x, q_segments=segments, **options)
    np.testing.assert_array_equal(run(x, segments), expected)
    with _deprecated("ring_attention"):
        out = thdkit.ring_attention(
            x, x, x, segment_ids_q=segments.ids, segment_pos_q=segments.positions, **options
        )
    np.testing.assert_array_equal(out, expected)


def _call(**overrides: Any) -> Any:
    x = jnp.zeros((1, 16, 4, 4))
    args = {"max_segments_per_seq": 1, "mesh": _mesh(), "axis_name": "cp"} | overrides
    return thdkit.context_parallel_attention(x, x, x, **args)


ONE_DOC = Segments.from_ids(np.ones((1, 16), np.int32))
ARRAYS = {"segment_ids_q": np.ones((1, 16), np.int32), "segment_pos_q": np.arange(16)[None]}
BOTH = r"not both; got "


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"q_segments": ONE_DOC} | ARRAYS, ValueError, BOTH + "q_segments, segment_ids_q"),
        (
            {"kv_segments": ONE_DOC, "segment_ids_kv": ARRAYS["segment_ids_q"]} | ARRAYS,
            ValueError,
            BOTH + "kv_segments, segment_ids_q, segment_pos_q, segment_ids_kv",
        ),
        # One form for both sides: Segments for the queries, arrays for the keys is a mix too.
        (
            {"q_segments": ONE_DOC, "segment_ids_kv": ARRAYS["segment_ids_q"]}
            | {"segment_pos_kv": ARRAYS["segment_pos_q"]},
            ValueError,
            BOTH + "q_segments, segment_ids_kv, segment_pos_kv",
        ),
        ({}, ValueError, r"pass the query layout: q_segments, a thdkit\.Segments"),
        (
            {"segment_ids_q": ARRAYS["segment_ids_q"]},
            ValueError,
            "pass the query layout.*got only segment_ids_q",
        ),
        ({"q_segments": (np.ones(16), np.arange(16))}, TypeError, "q_segments must be a thdkit"),
        (
            {"q_segments": Segments(np.ones((1, 16)), np.arange(16)[None], np.ones((1, 16)))},
            TypeError,
            "q_segments must be an integer array",
        ),
        (
            {
                "q_segments": Segments(
                    np.array([[1, 1, 0, 1] * 4]), np.arange(16)[None], ONE_DOC.ids
                )
            },
            ValueError,
            r"q_segments row \(0, 0\), token 3: id 1 starts a second run.*shard",
        ),
        (
            {"q_segments": ONE_DOC, "kv_segments": Segments.from_ids(np.full((1, 16), 2))},
            ValueError,
            r"kv_segments row \(0, 0\), token 0: id 2 exceeds max_segments_per_seq=1",
        ),
        (
            {"q_segments": Segments.from_ids(np.ones((2, 16), np.int32))},
            ValueError,
            re.escape("q_segments must have [B, T] fields of shape (1, 16) to match query"),
        ),
        (
            {"q_segments": ONE_DOC, "kv_segments": Segments.from_ids(np.ones((2, 16), int))},
            ValueError,
            "q_segments and kv_segments must have the same batch dims",
        ),
    ],
)
def test_invalid_layouts(overrides: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        # The deprecated arrays' messages name the arrays passed, as before.
        (
            {"segment_ids_q": np.ones((2, 16), np.int32), "segment_pos_q": np.zeros((2, 16))},
            "segment_pos_q must be an integer array",
        ),
        (
            {"segment_ids_q": np.ones((2, 16), np.int32), "segment_pos_q": np.ones((2, 16), int)},
            re.escape("segment_ids_q must have shape [B, T] = (1, 16)"),
        ),
        (ARRAYS | {"segment_ids_kv": ARRAYS["segment_ids_q"]}, "only segment_ids_kv was given"),
        (
            ARRAYS | {"segment_pos_q": np.array([[0, 2, 1, 3] * 4])},
            r"segment_pos_q row \(0, 0\), token 2",
        ),
    ],
)
def test_the_deprecated_arrays_name_themselves_in_errors(arrays: dict, match: str) -> None:
    error = TypeError if "integer" in match else ValueError
    with _deprecated("context_parallel_attention"), pytest.raises(error, match=match):
        _call(**arrays)


def test_ring_schedule_takes_segments_and_the_arrays_warn() -> None:
    q = _striped(Segments.from_ids(IDS_Q, POS_Q))
    kv = _striped(Segments.from_ids(IDS_KV, POS_KV))
    options = dict(cp=CP, mask_type="padding_causal_bottom_right", max_segments_per_seq=2)
    expected = thdkit.ring_schedule(q_segments=q, kv_segments=kv, **options)
    with _deprecated("ring_schedule"):
        deprecated = thdkit.ring_schedule(
            segment_ids_q=q.ids, segment_pos_q=q.positions, segment_ids_kv=kv.ids,
            segment_pos_kv=kv.positions, **options,
        )  # fmt: skip
    np.testing.assert_array_equal(deprecated, expected)
    # Self-attention, any batch dims: one row per [*B].
    self_schedule = thdkit.ring_schedule(q_segments=q, **options)
    batched = thdkit.ring_schedule(q_segments=jax.tree.map(lambda a: a[:, None], q), **options)
    np.testing.assert_array_equal(batched[:, 0], self_schedule)


IDS, POS = np.ones((1, 16), np.int32), np.arange(16, dtype=np.int32)[None]


def _segments(ids: Any, pos: Any = POS) -> Segments:
    """Segments as given (the bare constructor validates nothing), lengths unread."""
    return Segments(ids, pos, 0 * ids)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        # An id above S once gave an all-False schedule ("skip every step"); it is an error now.
        (
            {"q_segments": _segments(np.array([[1] * 8 + [3] * 8]))},
            ValueError,
            r"q_segments row \(0, 2\), token 0: id 3 exceeds max_segments_per_seq=2 \[row = ",
        ),
        (
            {"kv_segments": _segments(np.full((1, 16), 2), np.zeros((1, 16), int))},
            ValueError,
            r"kv_segments positions row \(0, 0\), token 1: position 0 does not increase",
        ),
        ({"segment_ids_q": IDS, "segment_pos_q": POS}, ValueError, BOTH + "q_segments, segm"),
        ({"q_segments": _segments(np.ones((1, 18), int))}, ValueError, "must have the same shape"),
        ({"cp": 3}, ValueError, r"cp=3 must divide the length of q_segments"),
        ({"cp": 0}, ValueError, "cp must be >= 1"),
        ({"cp": 2.0}, TypeError, "cp must be an int"),
        ({"max_segments_per_seq": 0}, ValueError, "max_segments_per_seq"),
    ],
)
def test_ring_schedule_validates_like_the_ring(
    overrides: dict[str, Any], error: type, match: str
) -> None:
    args = {"q_segments": _segments(IDS), "cp": CP, "max_segments_per_seq": 2} | overrides
    with pytest.raises(error, match=match):
        thdkit.ring_schedule(**args)


@pytest.mark.parametrize(
    ("ids", "pos", "match"),
    [
        (np.array([[1] * 8 + [3] * 8]), POS, r"segment_ids_q row \(0, 2\), token 0: id 3 exceeds"),
        (IDS, np.zeros((1, 16), int), r"segment_pos_q row \(0, 0\), token 1: position 0"),
    ],
)
def test_ring_schedule_names_the_deprecated_arrays_in_errors(ids, pos, match: str) -> None:
    with _deprecated("ring_schedule"), pytest.raises(ValueError, match=match):
        thdkit.ring_schedule(segment_ids_q=ids, segment_pos_q=pos, cp=CP, max_segments_per_seq=2)


def test_ring_schedule_under_jit_is_not_validated() -> None:
    """Traced layouts cannot be read: the schedule is computed, as the ring computes it."""
    ids = np.array([[1] * 8 + [3] * 8], np.int32)
    run = jax.jit(
        lambda ids: thdkit.ring_schedule(q_segments=_segments(ids), cp=CP, max_segments_per_seq=2)
    )
    assert run(ids).shape == (1, CP, CP)
