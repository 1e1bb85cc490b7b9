"""Segments: the converters against plain NumPy loops, the pytree through transforms, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from thdkit import reorder
from thdkit._src.segments import Segments, segment_counts
from thdkit._src.validate.segments import validate_segments

from .strategies import batches, np_run_lengths

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPE = (2, 16)


def np_positions_in_runs(ids: np.ndarray) -> np.ndarray:
    """Index of each token inside its run of equal non-zero ids, 0 on padding (a loop)."""
    out = np.zeros_like(ids)
    for t in range(1, len(ids)):
        if ids[t] != 0 and ids[t] == ids[t - 1]:
            out[t] = out[t - 1] + 1
    return out


@st.composite
def document_lengths(draw, *, seq_len: int):
    """Lengths (>= 0, empty documents included) of documents that fit in ``seq_len`` tokens."""
    lengths = draw(st.lists(st.integers(0, 5), min_size=1, max_size=6))
    kept, total = [], 0
    for n in lengths:
        if total + n > seq_len:
            break
        kept.append(n)
        total += n
    return kept


@SETTINGS
@given(layout=batches(shape=SHAPE, max_segments=5))
def test_from_ids_keeps_the_layout_and_adds_run_lengths(layout):
    ids, pos = layout
    seg = Segments.from_ids(ids, pos)
    np.testing.assert_array_equal(seg.ids, ids)
    np.testing.assert_array_equal(seg.positions, pos)
    np.testing.assert_array_equal(seg.lengths, np.stack([np_run_lengths(r) for r in ids]))
    assert seg.seq_len == SHAPE[-1] and seg.batch_shape == SHAPE[:-1]


@SETTINGS
@given(layout=batches(shape=SHAPE, max_segments=5))
def test_default_positions_count_inside_each_document(layout):
    ids, _ = layout
    seg = Segments.from_ids(ids)
    np.testing.assert_array_equal(seg.positions, np.stack([np_positions_in_runs(r) for r in ids]))


@SETTINGS
@given(layout=batches(shape=SHAPE, max_segments=5))
def test_padding_id_minus_one_is_a_shift(layout):
    ids, pos = layout
    shifted = Segments.from_ids(ids - 1, pos, padding_id=-1)
    plain = Segments.from_ids(ids, pos)
    for a, b in zip(jax.tree.leaves(shifted), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)


@SETTINGS
@given(lengths=document_lengths(seq_len=16))
def test_from_cu_seqlens_matches_a_loop(lengths):
    total_len = 18  # One shape for every example: cu_seqlens padded with empty documents.
    lengths = lengths + [0] * (6 - len(lengths))
    cu = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    ids = np.zeros(total_len, np.int32)
    pos = np.zeros(total_len, np.int32)
    for k, n in enumerate(lengths):
        ids[cu[k] : cu[k] + n] = k + 1
        pos[cu[k] : cu[k] + n] = np.arange(n)
    seg = Segments.from_cu_seqlens(cu, total_len=total_len)
    np.testing.assert_array_equal(seg.ids, ids[None])
    np.testing.assert_array_equal(seg.positions, pos[None])
    np.testing.assert_array_equal(seg.lengths, np_run_lengths(ids)[None])


def test_from_cu_seqlens_batched_and_under_jit():
    cu = jnp.array([[0, 2, 2, 5], [0, 1, 3, 3]])
    eager = Segments.from_cu_seqlens(cu, total_len=6)
    traced = jax.jit(Segments.from_cu_seqlens, static_argnames="total_len")(cu, total_len=6)
    np.testing.assert_array_equal(eager.ids, [[1, 1, 3, 3, 3, 0], [1, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(eager.positions, [[0, 1, 0, 1, 2, 0], [0, 0, 1, 0, 0, 0]])
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced), strict=True):
        np.testing.assert_array_equal(a, b)


@SETTINGS
@given(lengths=document_lengths(seq_len=16))
def test_from_positions_inverts_numbering(lengths):
    lengths = [n for n in lengths if n > 0]
    lengths.append(16 - sum(lengths))  # One shape (T = 16) for every example.
    position_ids = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    seg = Segments.from_positions(position_ids)
    expected = np.concatenate([np.full(n, k + 1) for k, n in enumerate(lengths)])
    np.testing.assert_array_equal(seg.ids, expected)
    np.testing.assert_array_equal(seg.positions, position_ids)
    np.testing.assert_array_equal(seg.lengths, np_run_lengths(expected))


def test_from_positions_starts_a_document_exactly_where_the_position_is_0():
    """Hugging Face's rule: [0, 1, 2, 1, 2, 3] is one document (no 0 after the first token)."""
    seg = Segments.from_positions(jnp.array([[0, 1, 2, 1, 2, 3], [0, 4, 2, 0, 0, 7]]))
    np.testing.assert_array_equal(seg.ids, [[1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 3, 3]])
    np.testing.assert_array_equal(seg.lengths, [[6] * 6, [3, 3, 3, 1, 2, 2]])


def test_a_pytree_through_jit_scan_and_tree_map():
    seg = Segments.from_ids(jnp.array([[1, 1, 1, 2, 2, 0, 3, 3]]))
    out = jax.jit(lambda s: jax.tree.map(lambda a: a + 1, s))(seg)
    assert isinstance(out, Segments)
    np.testing.assert_array_equal(out.lengths, seg.lengths + 1)

    def layer(carry, _):
        return carry + jnp.sum(seg.lengths), None

    total, _ = jax.lax.scan(layer, jnp.int32(0), None, length=3)
    assert int(total) == 3 * int(np.sum(seg.lengths))
    striped = jax.tree.map(lambda a: reorder.striped(a, cp=2), seg)
    np.testing.assert_array_equal(striped.lengths, reorder.striped(seg.lengths, cp=2))


@pytest.mark.parametrize("cp", [2, 4])
@settings(SETTINGS, max_examples=15)
@given(layout=batches(shape=(2, 16), max_segments=5, strides=(1,)))
def test_global_lengths_in_shards_are_the_document_lengths(cp, layout):
    ids, pos = layout
    seg = Segments.from_ids(ids, pos)
    shards = jax.tree.map(lambda a: reorder.striped(a, cp=cp, stripe_size=2), seg)
    np.testing.assert_array_equal(_global_lengths_fn(cp)(shards).lengths, shards.lengths)


@functools.cache
def _global_lengths_fn(cp: int):
    """Each shard's lengths zeroed, then rebuilt across the shards; jitted once per cp."""
    fn = jax.shard_map(
        lambda s: Segments(s.ids, s.positions, jnp.zeros_like(s.ids)).with_global_lengths(
            axis_name="cp", max_segments_per_seq=5
        ),
        mesh=Mesh(np.array(jax.devices()[:cp]), ("cp",)),
        in_specs=P(None, "cp"),
        out_specs=P(None, "cp"),
    )
    return jax.jit(fn)


def test_segment_counts():
    counts = segment_counts(jnp.array([[1, 1, 0, 2, 7], [0, 0, 0, 0, 0]]), num_segments=2)
    np.testing.assert_array_equal(counts, [[1, 2, 1], [5, 0, 0]])


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (
            lambda: Segments.from_ids(jnp.array([1, 1, 0, 1])),
            ValueError,
            "segment_ids row 0, token 3",
        ),
        (lambda: Segments.from_ids(jnp.array([2, 1])), ValueError, "segment_ids row 0, token 1"),
        (lambda: Segments.from_ids(jnp.array([1.0, 1.0])), TypeError, "segment_ids"),
        (lambda: Segments.from_ids(jnp.array([1, 1]), jnp.array([0])), ValueError, "segment_pos"),
        (lambda: Segments.from_ids(jnp.array([1, 1]), padding_id=3), ValueError, "padding_id"),
        (lambda: Segments.from_ids(jnp.array([1, 1]), padding_id=True), TypeError, "padding_id"),
        (
            lambda: Segments.from_ids(jnp.array([0, -2]), padding_id=-1),
            ValueError,
            "segment_ids row 0, token 1",
        ),
        (
            lambda: Segments.from_cu_seqlens(jnp.array([1, 3]), total_len=4),
            ValueError,
            "cu_seqlens row 0, entry 0",
        ),
        (
            lambda: Segments.from_cu_seqlens(jnp.array([0, 3, 2]), total_len=4),
            ValueError,
            "cu_seqlens row 0, entry 2",
        ),
        (
            lambda: Segments.from_cu_seqlens(jnp.array([0, 5]), total_len=4),
            ValueError,
            "total_len=4",
        ),
        (lambda: Segments.from_cu_seqlens(jnp.array([0]), total_len=4), ValueError, "cu_seqlens"),
        (lambda: Segments.from_cu_seqlens(jnp.array([0, 2]), total_len=0), ValueError, "total_len"),
        (
            lambda: Segments.from_cu_seqlens(jnp.array([0, 2]), total_len=2.0),
            TypeError,
            "total_len",
        ),
        (
            lambda: Segments.from_cu_seqlens(np.array([0, 2**33]), total_len=4),
            ValueError,
            "cu_seqlens",
        ),
        (lambda: Segments.from_positions(jnp.array([0, -1])), ValueError, "position_ids"),
    ],
)
def test_errors_name_the_parameter(call, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(")):
        call()


# --- Constructors: messages name the parameter and speak of what it holds ---------------------


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        (4.0, TypeError, "max_segments_per_seq must be a static Python int"),
        (True, TypeError, "max_segments_per_seq must be a static Python int"),
        ("4", TypeError, "max_segments_per_seq must be a static Python int"),
        (np.float32(4), TypeError, "max_segments_per_seq must be a static Python int"),
        (0, ValueError, "max_segments_per_seq must be in"),
        (2**31, ValueError, "max_segments_per_seq must be in"),
    ],
)
def test_with_global_lengths_checks_max_segments_per_seq(value, error, words):
    seg = Segments.from_ids(jnp.array([[1, 1, 2, 0]]))
    with pytest.raises(error, match=words):
        seg.with_global_lengths(axis_name="cp", max_segments_per_seq=value)


@pytest.mark.parametrize(
    "cu_seqlens",
    [[[0, 3], [0, 2, 4]], [[0, 1, 2], [0, 1]], [0, [1, 2]], [[[0, 1]], [[0, 1], [0, 2]]]],
)
def test_ragged_cu_seqlens_is_a_value_error_naming_it(cu_seqlens):
    with pytest.raises(ValueError, match="cu_seqlens must be a rectangular integer array"):
        Segments.from_cu_seqlens(cu_seqlens, total_len=8)


@pytest.mark.parametrize(
    ("position_ids", "words"),
    [
        (np.array([0, 1, 2**32 + 1], np.int64), "token 2: position 4294967297 is outside"),
        (np.array([0, 2**63 + 5], np.uint64), "token 1: position 9223372036854775813 is outside"),
        ([[0, 1], [0, 2**33]], r"row 1, token 1: position 8589934592 is outside the int32"),
        ([0, 1, -1], "token 2: position -1 is negative"),
        (np.array([[[0, 2**30]]]), r"row \(0, 0\), token 1: position 1073741824 exceeds"),
        (np.array([0, 2**40], np.int64), "token 1: position 1099511627776 is outside"),
    ],
)
def test_from_positions_range_errors_speak_of_positions(position_ids, words):
    with pytest.raises(ValueError, match=f"position_ids {'row 0, ' if 'row' not in words else ''}"):
        Segments.from_positions(position_ids)
    with pytest.raises(ValueError, match=words) as caught:
        Segments.from_positions(position_ids)
    message = str(caught.value)
    assert " id " not in message and "ids lie" not in message, message
    assert "positions lie in [0, 1073741823]" in message


@pytest.mark.parametrize(
    ("position_ids", "error", "words"),
    [
        ([0.0, 1.0], TypeError, "position_ids must be an integer array"),
        ([True, False], TypeError, "position_ids must be an integer array"),
        ([[0, 1], [0]], ValueError, "position_ids must be a rectangular integer array"),
        (np.int32(3), ValueError, "position_ids must be at least 1-D"),
        (np.zeros((2, 0), np.int32), ValueError, "position_ids must hold at least one token"),
    ],
)
def test_from_positions_dtype_and_shape_errors(position_ids, error, words):
    with pytest.raises(error, match=words):
        Segments.from_positions(position_ids)


def test_from_positions_accepts_the_top_of_the_range_and_traced_input():
    top = np.array([0, 1, 0, 2**30 - 1], np.int64)
    np.testing.assert_array_equal(Segments.from_positions(top).ids, [1, 1, 2, 2])
    traced = jax.jit(Segments.from_positions)(jnp.array([0, 1, 0, 5]))
    np.testing.assert_array_equal(traced.ids, [1, 1, 2, 2])


# --- validate_segments -------------------------------------------------------------------------

ROWS = np.array([[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 2, 2, 2, 0, 0, 3]], np.int32)
GOOD = Segments.from_ids(ROWS)


def _with(**fields) -> Segments:
    """GOOD with some fields replaced (NumPy values are set with ``.at``-style index edits)."""
    values = {name: getattr(GOOD, name) for name in ("ids", "positions", "lengths")}
    return Segments(**(values | fields))


def _set(field: str, index, value, dtype=np.int32) -> Segments:
    array = np.array(getattr(GOOD, field), dtype)
    array[index] = value
    return _with(**{field: array})


def _global(lengths) -> Segments:
    return _with(lengths=np.asarray(lengths, np.int32))


GLOBAL = [[8, 8, 8, 8, 4, 4, 0, 0], [2, 2, 5, 5, 5, 0, 0, 9]]  # whole documents in a shard

VALIDATE_ERRORS = {
    # structure
    "not Segments": (lambda: ROWS, {}, TypeError, r"q_segments must be a thdkit\.Segments"),
    "ids a tuple": (
        lambda: _with(ids=tuple(ROWS.tolist())),
        {},
        TypeError,
        r"q_segments\.ids must be",
    ),
    "lengths None": (lambda: _with(lengths=None), {}, TypeError, r"q_segments\.lengths must be"),
    "float lengths": (
        lambda: _with(lengths=np.asarray(GOOD.lengths, np.float32)),
        {},
        TypeError,
        r"q_segments\.lengths must be int32 .* got dtype float32",
    ),
    "int64 lengths": (
        lambda: _with(lengths=np.asarray(GOOD.lengths, np.int64)),
        {},
        TypeError,
        r"q_segments\.lengths must be int32 .* got dtype int64",
    ),
    "uint8 lengths": (
        lambda: _with(lengths=np.asarray(GOOD.lengths, np.uint8)),
        {},
        TypeError,
        r"q_segments\.lengths must be int32",
    ),
    "lengths shape": (
        lambda: _with(lengths=GOOD.lengths[:, :4]),
        {},
        ValueError,
        r"q_segments\.lengths must have the shape of q_segments\.ids, \(2, 8\), got \(2, 4\)",
    ),
    "lengths of one row": (
        lambda: _with(lengths=GOOD.lengths[0]),
        {},
        ValueError,
        r"q_segments\.lengths must have the shape",
    ),
    "float positions": (
        lambda: _with(positions=np.zeros((2, 8), np.float32)),
        {},
        TypeError,
        "q_segments positions must be an integer array",
    ),
    "positions shape": (
        lambda: _with(positions=GOOD.positions[:, :4]),
        {},
        ValueError,
        "q_segments and q_segments positions must have the same shape",
    ),
    # ids and positions (the layout rules)
    "second run": (lambda: _set("ids", (0, 6), 1), {}, ValueError, "q_segments row 0, token 6"),
    "ids decrease": (lambda: _set("ids", (1, 7), 1), {}, ValueError, "q_segments row 1, token 7"),
    "negative id": (lambda: _set("ids", (1, 6), -1), {}, ValueError, "q_segments row 1, token 6"),
    "id above S": (
        lambda: GOOD,
        {"max_segments_per_seq": 2},
        ValueError,
        "q_segments row 1, token 7: id 3 exceeds max_segments_per_seq=2",
    ),
    "positions stall (causal)": (
        lambda: _set("positions", (0, 2), 1),
        {"mask_type": "causal"},
        ValueError,
        "q_segments positions row 0, token 2",
    ),
    "negative position": (
        lambda: _set("positions", (1, 3), -4),
        {},
        ValueError,
        "q_segments positions row 1, token 3",
    ),
    # lengths of a whole row
    "length off inside a run": (
        lambda: _set("lengths", (0, 5), 3),
        {},
        ValueError,
        r"q_segments\.lengths row 0, token 5: 3 inside a run of length 2",
    ),
    "length of a run start": (
        lambda: _set("lengths", (1, 2), 2),
        {},
        ValueError,
        r"q_segments\.lengths row 1, token 2: 2 inside a run of length 3",
    ),
    "global lengths in a whole row": (
        lambda: _global(GLOBAL),
        {},
        ValueError,
        r"q_segments\.lengths row 0, token 0: 8 inside a run of length 4",
    ),
    "length on padding": (
        lambda: _set("lengths", (1, 6), 3),
        {},
        ValueError,
        r"q_segments\.lengths row 1, token 6: 3 on a padding token \(id 0\)",
    ),
    "zero length in a run": (
        lambda: _set("lengths", (1, 7), 0),
        {},
        ValueError,
        r"q_segments\.lengths row 1, token 7: 0 inside a run of length 1",
    ),
    "negative length": (
        lambda: _set("lengths", (0, 0), -4),
        {},
        ValueError,
        r"q_segments\.lengths row 0, token 0: -4 inside a run of length 4",
    ),
    "batch dims": (
        lambda: Segments(
            np.stack([ROWS, ROWS]),
            np.stack([GOOD.positions] * 2),
            np.stack([GOOD.lengths, np.where(ROWS == 3, 2, GOOD.lengths)]).astype(np.int32),
        ),
        {},
        ValueError,
        r"q_segments\.lengths row \(1, 1\), token 7: 2 inside a run of length 1",
    ),
    # lengths of a shard (global_lengths=True)
    "global: varies inside a run": (
        lambda: _global(np.array(GLOBAL) + np.eye(2, 8, 2, dtype=int)),
        {"global_lengths": True},
        ValueError,
        r"q_segments\.lengths row 0, token 2: 9 differs from 8 at token 0, where the run of id 1",
    ),
    "global: shorter than the run": (
        lambda: _global([[8, 8, 8, 8, 1, 1, 0, 0], GLOBAL[1]]),
        {"global_lengths": True},
        ValueError,
        r"q_segments\.lengths row 0, token 4: 1 inside a run of length 2; a whole document",
    ),
    "global: zero inside a run": (
        lambda: _global([GLOBAL[0], [2, 2, 5, 5, 5, 0, 0, 0]]),
        {"global_lengths": True},
        ValueError,
        r"q_segments\.lengths row 1, token 7: 0 inside a run of length 1",
    ),
    "global: padding": (
        lambda: _global([GLOBAL[0], [2, 2, 5, 5, 5, 0, 4, 9]]),
        {"global_lengths": True},
        ValueError,
        r"q_segments\.lengths row 1, token 6: 4 on a padding token",
    ),
    "global: above MAX_SEQ_LEN": (
        lambda: _global([GLOBAL[0], [2, 2, 5, 5, 5, 0, 0, 2**30 + 1]]),
        {"global_lengths": True},
        ValueError,
        r"q_segments\.lengths row 1, token 7: 1073741825 exceeds thdkit\.MAX_SEQ_LEN",
    ),
    # options
    "S float": (lambda: GOOD, {"max_segments_per_seq": 3.0}, TypeError, "max_segments_per_seq"),
    "S zero": (lambda: GOOD, {"max_segments_per_seq": 0}, ValueError, "max_segments_per_seq"),
    "unknown mask": (lambda: GOOD, {"mask_type": "sideways"}, ValueError, "mask_type"),
    "mask as int": (lambda: GOOD, {"mask_type": 3}, TypeError, "mask_type"),
    "name not a str": (lambda: GOOD, {"name": 1}, TypeError, "name must be a str"),
    "global_lengths a str": (
        lambda: GOOD,
        {"global_lengths": "yes"},
        TypeError,
        "global_lengths must be a bool",
    ),
}


@pytest.mark.parametrize("case", list(VALIDATE_ERRORS))
def test_validate_segments_errors_name_field_row_and_token(case):
    make, options, error, words = VALIDATE_ERRORS[case]
    with pytest.raises(error, match=words):
        validate_segments(make(), **({"name": "q_segments"} | options))


def test_validate_segments_accepts_what_the_constructors_build():
    for seg in (
        GOOD,
        Segments.from_ids(ROWS - 1, padding_id=-1),
        Segments.from_cu_seqlens(jnp.array([[0, 3, 3, 7], [0, 1, 2, 8]]), total_len=9),
        Segments.from_positions(jnp.array([[0, 1, 2, 0, 1, 0, 1, 2]])),
        _with(ids=jnp.asarray(ROWS, jnp.int16)),  # ids and positions: any integer dtype
    ):
        for mask in (None, "padding", "padding_causal", "causal_bottom_right"):
            validate_segments(seg, name="q_segments", mask_type=mask, max_segments_per_seq=3)
            # Run lengths are also valid global lengths (a shard that holds whole documents).
            validate_segments(seg, name="q_segments", mask_type=mask, global_lengths=True)
    validate_segments(_global(GLOBAL), name="kv_segments", global_lengths=True)
    # Rule 6 only where a mask type asks for it.
    stalled = _set("positions", (0, 2), 1)
    validate_segments(stalled, name="q_segments")
    validate_segments(stalled, name="q_segments", mask_type="padding")


@settings(SETTINGS, max_examples=10)
@given(layout=batches(shape=(2, 16), max_segments=5, strides=(1,)))
def test_shards_with_global_lengths_validate_as_global(layout):
    ids, pos = layout
    seg = Segments.from_ids(ids, pos)
    cp = 4
    striped = jax.tree.map(lambda a: reorder.striped(a, cp=cp, stripe_size=2), seg)
    rebuilt = _global_lengths_fn(cp)(striped)
    for rank in range(cp):
        shard = jax.tree.map(lambda a, rank=rank: reorder.shard(a, cp=cp, rank=rank), rebuilt)
        validate_segments(
            shard, name="kv_segments", mask_type="padding_causal", global_lengths=True
        )
        if not np.array_equal(shard.lengths, run_lengths_of(shard.ids)):
            with pytest.raises(ValueError, match=r"kv_segments\.lengths row \d+, token \d+: "):
                validate_segments(shard, name="kv_segments")


def run_lengths_of(ids) -> np.ndarray:
    return np.stack([np_run_lengths(row) for row in np.asarray(ids)])


def test_validate_segments_reads_no_traced_value():
    bad_lengths = _set("lengths", (0, 5), 3)
    bad_ids = _set("ids", (0, 6), 1)
    for seg in (bad_lengths, bad_ids):
        jaxpr = jax.make_jaxpr(lambda s: (validate_segments(s, name="q_segments"), s.ids)[1])(seg)
        assert not jaxpr.eqns  # nothing staged, nothing read
    # Static properties are checked under tracing too.
    with pytest.raises(TypeError, match=r"q_segments\.lengths must be int32"):
        jax.jit(
            lambda s: validate_segments(
                Segments(s.ids, s.positions, s.lengths.astype(jnp.float32)), name="q_segments"
            )
        )(GOOD)
    with pytest.raises(ValueError, match=r"q_segments\.lengths must have the shape"):
        jax.jit(
            lambda s: validate_segments(
                Segments(s.ids, s.positions, s.lengths[:, :2]), name="q_segments"
            )
        )(GOOD)
    # Under vmap the rows are traced: only the static checks run.
    jax.vmap(lambda s: validate_segments(s, name="q_segments"))(bad_lengths)


def test_validate_segments_checks_concrete_segments_closed_over_by_jit():
    bad = Segments(*(jnp.asarray(getattr(_set("lengths", (1, 3), 1), f)) for f in _FIELD_NAMES))
    with pytest.raises(ValueError, match=r"q_segments\.lengths row 1, token 3: 1 inside"):
        jax.jit(lambda: validate_segments(bad, name="q_segments"))()
    jax.jit(lambda: validate_segments(GOOD, name="q_segments"))()


_FIELD_NAMES = ("ids", "positions", "lengths")
