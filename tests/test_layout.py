"""Layout rules: eager validation messages, jit error codes, checkify, run lengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import thdkit
from thdkit._src.limits import MAX_POSITION, MAX_SEGMENTS, MAX_SEQ_LEN
from thdkit._src.synth import packed_segments
from thdkit._src.validate.rules import LayoutError

from .strategies import batches, np_run_lengths

# (ids, pos, mask_type, code, token, message); S = 3 throughout.
BROKEN_RULES = {
    "negative id": ([1, -1, 2], [0, 0, 0], "padding", LayoutError.NEGATIVE_ID, 1, r"token 1: id -1 is negative"),
    "id above S": ([1, 1, 4], [0, 1, 0], "padding", LayoutError.ID_ABOVE_MAX, 2, r"token 2: id 4 exceeds max_segments_per_seq=3"),
    "padding hole": ([1, 1, 0, 1], [0, 1, 2, 3], "padding", LayoutError.SECOND_RUN, 3, r"token 3: id 1 starts a second run \(a padding hole"),
    "id reused after a hole": ([1, 2, 2, 0, 2], [0, 0, 1, 0, 0], "padding", LayoutError.SECOND_RUN, 4, r"token 4: id 2 starts a second run"),
    "id reused later": ([1, 2, 1, 3], [0, 0, 0, 0], "padding", LayoutError.IDS_NOT_INCREASING, 2, r"token 2: id 1 follows id 2"),
    "ids decrease": ([2, 2, 1, 1], [0, 1, 0, 1], "padding", LayoutError.IDS_NOT_INCREASING, 2, r"token 2: id 1 follows id 2; non-zero ids must increase"),
    "negative position": ([1, 1, 0], [0, 1, -2], "padding", LayoutError.NEGATIVE_POSITION, 2, r"segment_pos row 0, token 2: position -2 is negative"),
    "positions stall": ([1, 1, 1], [0, 1, 1], "causal", LayoutError.POSITIONS_NOT_INCREASING, 2, r"segment_pos row 0, token 2: position 1 does not increase along the run of id 1"),
    "positions fall": ([1, 1, 2, 2], [0, 1, 5, 4], "causal_bottom_right", LayoutError.POSITIONS_NOT_INCREASING, 3, r"token 3: position 4 does not increase"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN_RULES))
def test_each_rule_raises_with_row_and_token(case):
    ids, pos, mask, _, _, message = BROKEN_RULES[case]
    with pytest.raises(ValueError, match=message):
        thdkit.validate_layout(
            jnp.array(ids), jnp.array(pos), max_segments_per_seq=3, mask_type=mask
        )


@pytest.mark.parametrize("case", list(BROKEN_RULES))
def test_error_codes_under_jit(case):
    ids, pos, mask, code, token, _ = BROKEN_RULES[case]
    codes = jax.jit(
        lambda i, p: thdkit.layout_error_codes(i, p, max_segments_per_seq=3, mask_type=mask)
    )(jnp.array([ids, [0] * len(ids)]), jnp.array([pos, [0] * len(ids)]))
    np.testing.assert_array_equal(codes.code, [int(code), 0])
    np.testing.assert_array_equal(codes.token, [token, -1])


def test_padding_masks_allow_any_positions_order():
    thdkit.validate_layout(
        jnp.array([1, 1, 1]), jnp.array([3, 1, 1]), max_segments_per_seq=1, mask_type="padding"
    )


def test_the_first_bad_row_is_reported_with_its_batch_index():
    ids = np.ones((2, 2, 5), np.int32)
    ids[1, 0, 2] = 0
    ids[1, 1, 1] = 0
    pos = np.broadcast_to(np.arange(5), ids.shape)
    with pytest.raises(ValueError, match=r"^queries row \(1, 0\), token 3: id 1 starts a second"):
        thdkit.validate_layout(ids, pos, max_segments_per_seq=1, name="queries")
    codes = thdkit.layout_error_codes(ids, pos, max_segments_per_seq=1)
    np.testing.assert_array_equal(codes.code, [[0, 0], [3, 3]])
    np.testing.assert_array_equal(codes.token, [[-1, -1], [3, 2]])


def test_check_layout_with_checkify():
    def fn(ids, pos):
        thdkit.check_layout(ids, pos, max_segments_per_seq=2, name="segment_ids_q")
        return ids.sum()

    checked = jax.jit(checkify.checkify(fn))
    err, _ = checked(
        jnp.array([[1, 1, 2, 2], [1, 2, 2, 0]]), jnp.array([[0, 1, 0, 1], [0, 0, 1, 2]])
    )
    assert err.get() is None
    err, _ = checked(jnp.array([[1, 1, 2, 2], [1, 0, 1, 0]]), jnp.array([[0, 1, 0, 1]] * 2))
    message = err.get()
    assert "segment_ids_q: invalid layout in row 1, token 2: code 3" in message
    with pytest.raises(checkify.JaxRuntimeError, match="SECOND_RUN"):
        err.throw()


def test_validate_layout_refuses_traced_values():
    def fn(ids):
        thdkit.validate_layout(ids, ids, max_segments_per_seq=2)
        return ids

    for transform in (jax.jit, jax.vmap):
        with pytest.raises(TypeError, match=r"under jit or vmap use thdkit\.layout_error_codes"):
            transform(fn)(jnp.array([[1, 1]]))


@settings(max_examples=100, deadline=None)
@given(layout=batches(shape=(3, 20), max_segments=5))
def test_drawn_layouts_are_valid_and_codes_agree(layout):
    ids, pos = layout
    thdkit.validate_layout(ids, pos, max_segments_per_seq=5, mask_type="causal")
    codes = thdkit.layout_error_codes(ids, pos, max_segments_per_seq=5, mask_type="causal")
    assert not np.any(codes.code)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 3), min_size=1, max_size=16).map(np.array))
def test_run_lengths_match_a_loop(ids):
    padded = np.zeros(16, np.int64)
    padded[: len(ids)] = ids  # one shape for every example
    np.testing.assert_array_equal(thdkit.run_lengths(jnp.asarray(padded)), np_run_lengths(padded))


def test_run_lengths_batched():
    ids = jnp.array([[[1, 1, 0, 2]], [[3, 3, 3, 3]]])
    np.testing.assert_array_equal(thdkit.run_lengths(ids), [[[2, 2, 0, 1]], [[4, 4, 4, 4]]])


def test_corrupted_valid_layouts_are_caught():
    """A hole punched into any document of a valid layout is always reported at the right token."""
    rng = np.random.default_rng(0)
    ids, pos = packed_segments(rng, batch=1, seq_len=64, max_segments=4, min_len=4)
    for start in np.flatnonzero((ids[0] != 0) & (np.roll(ids[0], -1) == ids[0]))[:20]:
        if start + 2 >= 64 or ids[0, start + 2] != ids[0, start]:
            continue
        broken = ids.copy()
        broken[0, start + 1] = 0
        with pytest.raises(ValueError, match=rf"row 0, token {start + 2}: id \d+ starts a second"):
            thdkit.validate_layout(broken, pos, max_segments_per_seq=4)


# --- accepted ranges -------------------------------------------------------------------------


def test_range_constants():
    assert (MAX_POSITION, MAX_SEQ_LEN, MAX_SEGMENTS) == (2**30 - 1, 2**30, 2**30 - 1)
    # The largest sums the methods form stay inside int32.
    assert np.iinfo(np.int32).max >= MAX_POSITION + MAX_SEQ_LEN


# (ids, pos, parameter, row, token, value); values outside int32 never wrap around.
OUTSIDE_INT32 = {
    "int64 id": (np.array([[1, 2**32 + 2]], np.int64), np.zeros((1, 2), np.int64), "segment_ids", 0, 1, "id 4294967298"),
    "uint32 id": (np.array([1, 2**32 - 1], np.uint32), np.zeros(2, np.uint32), "segment_ids", 0, 1, "id 4294967295"),
    "uint64 id": (np.array([[1, 1], [1, 2**63]], np.uint64), np.zeros((2, 2), np.int32), "segment_ids", 1, 1, "id 9223372036854775808"),
    "negative int64 id": (np.array([-(2**40), 1]), np.zeros(2, np.int64), "segment_ids", 0, 0, "id -1099511627776"),
    "list id": ([[1, 1], [1, 2**33]], [[0, 1], [0, 1]], "segment_ids", 1, 1, "id 8589934592"),
    "int64 position": (np.ones((2, 3), np.int64), np.array([[0, 1, 2], [0, 1, 2**31]]), "segment_pos", 1, 2, "position 2147483648"),
    "list position beyond int64": ([1, 1], [0, 2**70], "segment_pos", 0, 1, f"position {2**70}"),
    "nested batch": (np.ones((2, 2, 2), np.int64), np.array([[[0, 1]] * 2, [[0, 1], [2**35, 0]]]), "segment_pos", (1, 1), 0, f"position {2**35}"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OUTSIDE_INT32))
def test_values_outside_int32_raise_with_row_and_token(case):
    ids, pos, parameter, row, token, value = OUTSIDE_INT32[case]
    row = str(row).replace(" ", r"\s?").replace("(", r"\(").replace(")", r"\)")
    pattern = rf"^{parameter} row {row}, token {token}: {value} is outside the int32 range"
    with pytest.raises(ValueError, match=pattern):
        thdkit.validate_layout(ids, pos, max_segments_per_seq=3)
    kv_pattern = pattern.replace(parameter, parameter + "_kv")
    with pytest.raises(ValueError, match=kv_pattern):
        thdkit.seqlens_and_offsets(
            segment_ids_q=np.ones(np.shape(ids), np.int32),
            segment_pos_q=np.zeros(np.shape(ids), np.int32),
            segment_ids_kv=ids,
            segment_pos_kv=pos,
            max_segments_per_seq=3,
        )


def test_codes_for_values_outside_int32_are_computed_before_the_cast():
    # uint32 keeps its dtype under jit even with x64 off: 2**32 - 1 must not read as -1.
    ids = jnp.array([[1, 2**32 - 1], [1, 1]], jnp.uint32)
    codes = jax.jit(
        lambda i, p: thdkit.layout_error_codes(i, p, max_segments_per_seq=3, mask_type="padding")
    )(ids, jnp.zeros((2, 2), jnp.uint32))
    np.testing.assert_array_equal(codes.code, [LayoutError.ID_OUTSIDE_INT32, 0])
    np.testing.assert_array_equal(codes.token, [1, -1])
    with jax.enable_x64(True):
        ids = jnp.array([[1, 2**32 + 1], [1, 1], [1, 1], [-(2**40), 1]], jnp.int64)
        pos = jnp.array([[0, 0], [0, -(2**40)], [0, 2**30], [0, 1]], jnp.int64)
        codes = jax.jit(lambda i, p: thdkit.layout_error_codes(i, p, max_segments_per_seq=3))(
            ids, pos
        )
    np.testing.assert_array_equal(
        codes.code,
        [
            LayoutError.ID_OUTSIDE_INT32,
            LayoutError.POSITION_OUTSIDE_INT32,
            LayoutError.POSITION_ABOVE_MAX,
            LayoutError.ID_OUTSIDE_INT32,
        ],
    )
    np.testing.assert_array_equal(codes.token, [1, 1, 1, 0])


def test_positions_above_max_position():
    ids = np.array([[1, 1], [2, 2]])
    ok = np.array([[0, 1], [MAX_POSITION - 1, MAX_POSITION]])
    thdkit.validate_layout(ids, ok, max_segments_per_seq=2)
    bad = ok + np.array([[0, 0], [1, 1]])
    with pytest.raises(
        ValueError,
        match=rf"^segment_pos row 1, token 1: position {MAX_POSITION + 1} exceeds thdkit.MAX_POSITION",
    ):
        thdkit.validate_layout(ids, bad, max_segments_per_seq=2, mask_type="padding")
    codes = thdkit.layout_error_codes(ids, bad, max_segments_per_seq=2)
    np.testing.assert_array_equal(codes.code, [0, LayoutError.POSITION_ABOVE_MAX])


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (
            2**31 - 1,
            ValueError,
            r"max_segments_per_seq must be in \[1, 1073741823\], got 2147483647",
        ),
        (MAX_SEGMENTS + 1, ValueError, r"max_segments_per_seq must be in"),
        (0, ValueError, r"max_segments_per_seq must be in \[1, "),
        (True, TypeError, r"max_segments_per_seq must be a static Python int"),
        (np.bool_(True), TypeError, r"max_segments_per_seq must be a static Python int"),
        (3.0, TypeError, r"max_segments_per_seq must be a static Python int .*, got float"),
    ],
)
def test_bad_max_segments(value, error, pattern):
    for check in (thdkit.validate_layout, thdkit.layout_error_codes):
        with pytest.raises(error, match=pattern):
            check(jnp.array([1, 1]), jnp.array([0, 1]), max_segments_per_seq=value)


def test_numpy_int_max_segments_is_accepted():
    codes = thdkit.layout_error_codes(
        jnp.array([1, 3]), jnp.array([0, 0]), max_segments_per_seq=np.int64(2)
    )
    assert codes.code.tolist() == LayoutError.ID_ABOVE_MAX


def test_rows_longer_than_max_seq_len_are_refused_from_the_shape():
    too_long = jax.ShapeDtypeStruct((2, MAX_SEQ_LEN + 1), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids has T=1073741825 tokens per row; at most"):
        jax.eval_shape(
            lambda i, p: thdkit.layout_error_codes(i, p, max_segments_per_seq=2), too_long, too_long
        )


def test_no_bound_on_ids_beyond_max_segments():
    ids, pos = jnp.array([[5, 5, 0, 900]]), jnp.array([[0, 1, 0, 0]])
    thdkit.validate_layout(ids, pos, max_segments_per_seq=None, mask_type="padding")
    codes = thdkit.layout_error_codes(ids, pos, max_segments_per_seq=None)
    assert codes.code.tolist() == [0]
    with pytest.raises(ValueError, match=r"token 1: id 1073741824 exceeds thdkit.MAX_SEGMENTS"):
        thdkit.validate_layout(
            jnp.array([1, MAX_SEGMENTS + 1]), jnp.array([0, 0]), max_segments_per_seq=None
        )
    with pytest.raises(ValueError, match=r"token 2: id 5 starts a second run"):
        thdkit.validate_layout(
            jnp.array([5, 0, 5]), jnp.array([0, 0, 0]), max_segments_per_seq=None
        )


def test_checks_allocate_nothing_sized_by_max_segments():
    """Even with S = MAX_SEGMENTS, no intermediate is larger than a few rows of tokens."""
    ids = jnp.ones((2, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(
        lambda i, p: thdkit.layout_error_codes(i, p, max_segments_per_seq=MAX_SEGMENTS)
    )(ids, ids)
    sizes = [v.aval.size for eqn in jaxpr.eqns for v in eqn.outvars]
    assert sizes and max(sizes) <= ids.size


# --- empty batches and vmap ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 8)])
def test_empty_batch(shape):
    ids = np.zeros(shape, np.int32)
    thdkit.validate_layout(ids, ids, max_segments_per_seq=2)
    codes = thdkit.layout_error_codes(ids, ids, max_segments_per_seq=None)
    assert codes.code.shape == codes.token.shape == shape[:-1]

    def fn(i, p):
        thdkit.check_layout(i, p, max_segments_per_seq=2)
        return i

    err, _ = jax.jit(checkify.checkify(fn))(ids, ids)
    assert err.get() is None


_BAD_ROWS = (jnp.array([[1, 1, 2, 2], [1, 0, 1, 0]]), jnp.array([[0, 1, 0, 1]] * 2))


def _checked(ids, pos):
    thdkit.check_layout(ids, pos, max_segments_per_seq=2, name="segment_ids_q")
    return ids.sum()


@pytest.mark.parametrize(
    "transform",
    [
        lambda f: checkify.checkify(jax.vmap(f)),
        lambda f: jax.jit(checkify.checkify(jax.vmap(f))),
        lambda f: jax.jit(jax.vmap(checkify.checkify(f))),
    ],
    ids=["checkify-vmap", "jit-checkify-vmap", "jit-vmap-checkify"],
)
def test_check_layout_under_vmap(transform):
    checked = transform(_checked)
    err, _ = checked(_BAD_ROWS[0][:1], _BAD_ROWS[1][:1])
    assert err.get() is None
    err, _ = checked(*_BAD_ROWS)
    # Inside vmap each call sees one row: the row index counts within the mapped slice.
    assert "segment_ids_q: invalid layout in row 0, token 2: code 3" in err.get()
    with pytest.raises(checkify.JaxRuntimeError, match="SECOND_RUN"):
        err.throw()


def test_layout_error_codes_under_vmap_match_the_batched_call():
    ids = jnp.array([[1, 1, 2, 2], [1, 0, 1, 0], [2, 2, 1, 1]])
    pos = jnp.array([[0, 1, 0, 1]] * 3)
    batched = thdkit.layout_error_codes(ids, pos, max_segments_per_seq=2)
    mapped = jax.vmap(lambda i, p: thdkit.layout_error_codes(i, p, max_segments_per_seq=2))(
        ids, pos
    )
    np.testing.assert_array_equal(mapped.code, batched.code)
    np.testing.assert_array_equal(mapped.token, batched.token)
    assert batched.code.tolist() == [0, LayoutError.SECOND_RUN, LayoutError.IDS_NOT_INCREASING]


# --- property: values outside int32 always raise -------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    layout=batches(shape=(2, 3, 12), max_segments=4),
    side=st.sampled_from(["segment_ids_q", "segment_pos_q", "segment_ids_kv", "segment_pos_kv"]),
    where=st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(0, 11)),
    value=st.one_of(st.integers(2**31, 2**63 - 1), st.integers(-(2**63), -(2**31) - 1)),
)
def test_values_outside_int32_always_raise_eagerly(layout, side, where, value):
    ids, pos = (a.astype(np.int64) for a in layout)
    arrays = {
        "segment_ids_q": ids,
        "segment_pos_q": pos,
        "segment_ids_kv": ids.copy(),
        "segment_pos_kv": pos.copy(),
    }
    arrays[side][where] = value
    kind = "id" if "ids" in side else "position"
    row = rf"\({where[0]}, {where[1]}\)"
    with pytest.raises(
        ValueError,
        match=rf"^{side} row {row}, token {where[2]}: {kind} {value} is outside the int32 range",
    ):
        thdkit.seqlens_and_offsets(**arrays, max_segments_per_seq=4)
