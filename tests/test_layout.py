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
from thdkit.layout import LayoutError

from .strategies import batches, np_run_lengths

# (ids, pos, mask_type, code, token, message); S = 3 throughout.
BROKEN_RULES = {
    "negative id": ([1, -1, 2], [0, 0, 0], "padding", LayoutError.NEGATIVE_ID, 1, r"token 1: id -1 is negative"),
    "id above S": ([1, 1, 4], [0, 1, 0], "padding", LayoutError.ID_ABOVE_MAX, 2, r"token 2: id 4 exceeds max_segments_per_seq=3"),
    "padding hole": ([1, 1, 0, 1], [0, 1, 2, 3], "padding", LayoutError.SECOND_RUN, 3, r"token 3: id 1 starts a second run \(a padding hole"),
    "id reused later": ([1, 2, 1, 3], [0, 0, 0, 0], "padding", LayoutError.SECOND_RUN, 2, r"token 2: id 1 starts a second run"),
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

    with pytest.raises(TypeError, match=r"under jit use thdkit\.layout_error_codes"):
        jax.jit(fn)(jnp.array([1, 1]))


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
    ids, pos = thdkit.synth.packed_segments(rng, batch=1, seq_len=64, max_segments=4, min_len=4)
    for start in np.flatnonzero((ids[0] != 0) & (np.roll(ids[0], -1) == ids[0]))[:20]:
        if start + 2 >= 64 or ids[0, start + 2] != ids[0, start]:
            continue
        broken = ids.copy()
        broken[0, start + 1] = 0
        with pytest.raises(ValueError, match=rf"row 0, token {start + 2}: id \d+ starts a second"):
            thdkit.validate_layout(broken, pos, max_segments_per_seq=4)
