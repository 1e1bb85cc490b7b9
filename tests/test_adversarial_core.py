"""Adversarial inputs to the core entry points: wide integers, empty rows, out-of-range indices,
Hugging Face's position rule, the context-parallel advice, optional positions, list fields.

The oracles are NumPy transcriptions of the documented behaviour of FlashAttention's
``bert_padding.unpad_input`` (``cu_seqlens`` over the rows of ``attention_mask``, an empty row a
zero-length entry) and of Hugging Face's ``prepare_fa_kwargs_from_position_ids`` (a document
starts where the flattened ``position_ids`` is 0).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import thdkit
from thdkit import reorder
from thdkit._src.validate.rules import looks_reordered

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
B, T = 3, 8
WIDE = [2**31, 2**32 + 3, 2**40, -(2**40)]
CP_ADVICE = "context parallelism"


def _fa_unpad_input(x: np.ndarray, attention_mask: np.ndarray):
    """FlashAttention's unpad_input as documented: the tokens where the mask is set, in
    row-major order; cu_seqlens the running sum of each row's count (B + 1 entries)."""
    seqlens = attention_mask.sum(-1).astype(np.int32)
    indices = np.flatnonzero(attention_mask.reshape(-1))
    cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    return x.reshape(-1, *x.shape[2:])[indices], indices, cu, int(seqlens.max(initial=0))


def _hf_cu_seqlens(position_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Hugging Face's rule as documented: starts where the flattened position is 0, then the
    number of tokens; max_seqlen the longest difference."""
    flat = position_ids.reshape(-1)
    cu = np.concatenate([np.flatnonzero(flat == 0), [flat.size]]).astype(np.int32)
    return cu, int(np.diff(cu).max())


# --- 1. Wide integers raise, they never wrap ---------------------------------------------------


@pytest.mark.parametrize("value", WIDE)
@pytest.mark.parametrize("form", ["int64", "list", "segments"])
def test_unpad_refuses_ids_outside_int32_whatever_their_form(value, form):
    ids = np.array([[1, 1, 3, value]], np.int64)
    segments = {
        "int64": ids,
        "list": ids.tolist(),
        "segments": thdkit.Segments(ids, np.zeros_like(ids), np.ones_like(ids, np.int32)),
    }[form]
    pattern = rf"^segments row 0, token 3: id {value} is outside the int32 range"
    with pytest.raises(ValueError, match=pattern):
        thdkit.unpad(np.ones((1, 4, 1), np.float32), segments)


@pytest.mark.parametrize("value", WIDE)
def test_every_conversion_path_refuses_wide_values_with_numpy_int64(value):
    wide = np.array([[1, 1, 2, value]], np.int64)
    pos = np.array([[0, 1, 0, 0]], np.int64)
    calls = {
        "from_ids": (lambda: thdkit.Segments.from_ids(wide), "segment_ids row 0, token 3"),
        "seqlens_and_offsets": (
            lambda: thdkit.seqlens_and_offsets(
                segment_ids_q=wide, segment_pos_q=pos, max_segments_per_seq=3
            ),
            "segment_ids_q row 0, token 3",
        ),
        "from_positions": (
            lambda: thdkit.Segments.from_positions(np.array([[0, 1, 2, value]], np.int64)),
            "position_ids row 0, token 3",
        ),
        "from_cu_seqlens": (
            lambda: thdkit.Segments.from_cu_seqlens(np.array([0, 1, value]), total_len=4),
            r"cu_seqlens at \(2,\)",
        ),
        "Segments list": (
            lambda: thdkit.Segments(wide.tolist(), pos.tolist(), [[2, 2, 1, 1]]),
            r"Segments.ids at \(0, 3\)",
        ),
        "pad": (
            lambda: thdkit.pad(np.ones(2), np.array([0, value], np.int64), 1, 4),
            rf"indices\[1\] = {value} is outside \[0, 4\]",
        ),
    }
    for name, (call, where) in calls.items():
        with pytest.raises(ValueError, match=where):
            call()
        assert str(value) in _message(call), name


def test_python_ints_beyond_int64_raise_as_values_not_dtypes():
    with pytest.raises(ValueError, match=r"cu_seqlens at \(1,\): 1180591620717411303424 is"):
        thdkit.Segments.from_cu_seqlens([0, 2**70], total_len=4)
    with pytest.raises(ValueError, match=r"^segments row 0, token 1: id 1180591620717411303424"):
        thdkit.unpad(np.ones((1, 2)), [[1, 2**70]])


@pytest.mark.parametrize("value", WIDE)
def test_under_x64_jax_int64_arrays_raise_too(value):
    with jax.enable_x64(True):
        wide = jnp.array([[1, 1, 2, value]], jnp.int64)
        assert wide.dtype == jnp.int64
        x = jnp.ones((1, 4, 1), jnp.float32)
        with pytest.raises(ValueError, match=rf"^segments row 0, token 3: id {value} is outside"):
            thdkit.unpad(x, wide)
        with pytest.raises(ValueError, match="segment_ids row 0, token 3"):
            thdkit.Segments.from_ids(wide)
        with pytest.raises(ValueError, match="segment_ids_q row 0, token 3"):
            thdkit.seqlens_and_offsets(segment_ids_q=wide, max_segments_per_seq=3)
        with pytest.raises(ValueError, match=r"cu_seqlens at \(2,\)"):
            thdkit.Segments.from_cu_seqlens(jnp.array([0, 1, value], jnp.int64), total_len=4)
        with pytest.raises(ValueError, match=r"indices\[1\]"):
            thdkit.pad(jnp.ones(2), jnp.array([0, value], jnp.int64), 1, 4)


def _message(call) -> str:
    try:
        call()
    except ValueError as error:
        return str(error)
    raise AssertionError("no error")


# --- 2. unpad's cu_seqlens: FlashAttention's unpad_input, an empty row included ----------------


@st.composite
def masks(draw):
    """bool[B, T] attention masks: per row one contiguous stretch (left, right or no padding,
    or none at all)."""
    rows = []
    for _ in range(B):
        start = draw(st.integers(0, T))
        length = draw(st.integers(0, T - start))
        rows.append((np.arange(T) >= start) & (np.arange(T) < start + length))
    return np.stack(rows)


@SETTINGS
@given(mask=masks())
def test_unpad_matches_flash_attention_unpad_input_on_drawn_masks(mask):
    x = np.arange(B * T * 2, dtype=np.float32).reshape(B, T, 2)
    tokens, indices, cu, max_seqlen = _fa_unpad_input(x, mask)
    for form in (mask, mask.astype(np.int64)):  # a boolean mask, or Hugging Face's 0/1 ints
        got = thdkit.unpad(x, form)
        np.testing.assert_array_equal(got.cu_seqlens, cu)
        np.testing.assert_array_equal(got.indices, indices)
        np.testing.assert_array_equal(got.x, tokens)
        assert got.max_seqlen == max_seqlen
        np.testing.assert_array_equal(thdkit.pad(got.x, got.indices, B, T), x * mask[..., None])


def test_a_padding_only_row_keeps_its_entry_eagerly_and_under_jit():
    mask = np.array([[False] * T, [True] * 3 + [False] * (T - 3), [True] * T])
    x = np.ones((B, T, 1), np.float32)
    np.testing.assert_array_equal(thdkit.unpad(x, mask).cu_seqlens, [0, 0, 3, 3 + T])
    fixed = jax.jit(lambda m: thdkit.unpad(x, m, capacity=B * T, max_segments_per_seq=1))(mask)
    np.testing.assert_array_equal(fixed.cu_seqlens, [0, 0, 3, 3 + T])
    # Several documents a row: each row's documents, and one empty entry for an empty row.
    ids = np.array([[0] * T, [1, 1, 2, 2, 2, 0, 3, 3], [0] * T])
    np.testing.assert_array_equal(thdkit.unpad(x, ids).cu_seqlens, [0, 0, 2, 5, 7, 7])
    traced = jax.jit(lambda i: thdkit.unpad(x, i, capacity=B * T).cu_seqlens)(ids)
    assert traced.shape == (B * T + 1,)  # min(capacity + B, B * T) + 1
    np.testing.assert_array_equal(traced[:6], [0, 0, 2, 5, 7, 7])
    np.testing.assert_array_equal(traced[6:], 7)


# --- 3. pad: one rule for indices ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, -4, -5, 5, 9, 2**20])
def test_pad_refuses_indices_outside_the_slots_naming_position_and_value(bad):
    for indices in (np.array([0, bad]), jnp.array([0, bad]), [0, bad]):
        with pytest.raises(ValueError, match=rf"^indices\[1\] = {bad} is outside \[0, 4\]"):
            thdkit.pad(np.array([1.0, 2.0]), indices, 1, 4)


def test_pad_drops_the_fill_index_and_under_jit_never_wraps_a_negative_one():
    x = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(thdkit.pad(x, np.array([0, 4, 2]), 1, 4), [[1, 0, 3, 0]])
    jitted = jax.jit(thdkit.pad, static_argnums=(2, 3))
    for index in (-1, -4, 4, 7):
        out = jitted(x, jnp.array([0, index, 2]), 1, 4)
        np.testing.assert_array_equal(out, [[1.0, 0.0, 3.0, 0.0]], err_msg=str(index))


# --- 4. from_positions: Hugging Face's rule ----------------------------------------------------


@st.composite
def position_rows(draw):
    """int[2, 10] position ids, each row starting at 0; any later value in [0, 3]."""
    rows = [[0, *draw(st.lists(st.integers(0, 3), min_size=9, max_size=9))] for _ in range(2)]
    return np.array(rows, np.int32)


@SETTINGS
@given(position_ids=position_rows())
def test_from_positions_matches_hugging_face_on_drawn_rows(position_ids):
    cu, max_seqlen = _hf_cu_seqlens(position_ids)
    seg = thdkit.Segments.from_positions(position_ids)
    got = thdkit.unpad(np.zeros((*position_ids.shape, 1), np.float32), seg)
    np.testing.assert_array_equal(got.cu_seqlens, cu)
    assert got.max_seqlen == max_seqlen
    np.testing.assert_array_equal(seg.positions, position_ids)


@pytest.mark.parametrize(
    ("position_ids", "where"),
    [
        ([[3, 4, 0, 1]], "row 0, token 0: position 3"),
        ([[0, 1, 2, 3], [1, 2, 0, 1]], "row 1, token 0: position 1"),
        ([[[0, 1], [5, 0]]], r"row \(0, 1\), token 0: position 5"),
    ],
)
def test_from_positions_refuses_rows_that_do_not_start_at_0(position_ids, where):
    with pytest.raises(ValueError, match=f"^position_ids {where} where a row must start with 0"):
        thdkit.Segments.from_positions(np.array(position_ids))


def test_from_positions_under_jit_gives_leading_tokens_a_document_of_their_own():
    seg = jax.jit(thdkit.Segments.from_positions)(jnp.array([[3, 4, 0, 1, 2, 1]]))
    np.testing.assert_array_equal(seg.ids, [[1, 1, 2, 2, 2, 2]])


# --- 5. unpad's messages name segments; nothing to gather is an empty result -------------------


@pytest.mark.parametrize(
    ("segments", "where"),
    [
        (
            np.array([[True, False, True, True]]),
            "segments (a boolean attention mask) row 0, token 2",
        ),
        (np.array([[1, 1, 1, 1], [1, 0, 0, 1]]), "segments row 1, token 3"),
        (np.array([[1, 1, 0, 1]], np.int64), "segments row 0, token 3"),
    ],
)
def test_unpad_holes_name_segments_row_and_token_without_advice(segments, where):
    message = _message(lambda: thdkit.unpad(np.ones((*segments.shape, 1)), segments))
    assert message.startswith(where), message
    assert CP_ADVICE not in message and "segment_ids" not in message, message


@pytest.mark.parametrize("shape", [(2, 4), (0, 4)])
def test_unpad_of_no_real_token_is_empty(shape):
    for segments in (np.zeros(shape, bool), np.zeros(shape, np.int32)):
        got = thdkit.unpad(np.ones((*shape, 3), np.float32), segments)
        assert got.x.shape == (0, 3) and got.indices.shape == (0,) and got.max_seqlen == 0
        np.testing.assert_array_equal(got.cu_seqlens, np.zeros(shape[0] + 1))
        assert thdkit.pad(got.x, got.indices, *shape).shape == (*shape, 3)
    fixed = jax.jit(lambda i: thdkit.unpad(np.ones((2, 4)), i, capacity=2))(np.zeros((2, 4), int))
    np.testing.assert_array_equal(fixed.cu_seqlens, [0, 0, 0, 0, 0])  # min(2 + B, B*T) + 1
    np.testing.assert_array_equal(fixed.indices, [8, 8])


def test_unpad_size_errors_name_segments():
    with pytest.raises(ValueError, match="capacity=1 is below the 3 real tokens of segments"):
        thdkit.unpad(np.ones((1, 4)), [[1, 1, 0, 2]], capacity=1)
    with pytest.raises(
        ValueError, match="max_segments_per_seq=1 is below the 2 documents of segments row 1"
    ):
        thdkit.unpad(np.ones((2, 4)), [[1, 1, 1, 1], [1, 1, 2, 2]], max_segments_per_seq=1)
    with (
        pytest.warns(DeprecationWarning, match="max_documents"),
        pytest.raises(ValueError, match="max_documents=1 is below the 2 sequences of segments"),
    ):
        thdkit.unpad(np.ones((2, 4)), [[0, 0, 0, 0], [1, 1, 1, 1]], max_documents=1)


# --- 6. The context-parallel advice goes only to rows that look reordered ----------------------


PLAIN_MISTAKES = {
    "padding hole, numbered": ([1, 1, 0, 1, 2, 2], None),
    "padding hole, positions continue": ([1, 1, 0, 1, 2, 2], [0, 1, 2, 3, 0, 1]),
    "reused id": ([1, 1, 2, 2, 1, 1], [0, 1, 0, 1, 0, 1]),
    "ids out of order": ([2, 2, 1, 1, 3, 3], [0, 1, 0, 1, 0, 1]),
    "positions stall": ([1, 1, 1, 2, 2, 2], [0, 1, 1, 0, 1, 2]),
}


@pytest.mark.parametrize("case", list(PLAIN_MISTAKES))
def test_plain_mistakes_get_no_context_parallel_advice(case):
    ids, pos = (None if a is None else np.array([a]) for a in PLAIN_MISTAKES[case])
    if pos is None:
        calls = [lambda: thdkit.Segments.from_ids(ids), lambda: thdkit.unpad(np.ones((1, 6)), ids)]
    else:
        calls = [
            lambda: thdkit.seqlens_and_offsets(
                segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=3
            ),
            lambda: thdkit.validate_layout(ids, pos, max_segments_per_seq=3),
        ]
    for call in calls:
        message = _message(call)
        assert re.search(r"row 0, token \d", message) and CP_ADVICE not in message, message
    assert pos is None or not looks_reordered(ids[0], pos[0])


def _striped_rows(kind: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 0, 0]])
    seg = thdkit.Segments.from_ids(ids)
    move = {
        "striped cp=2": lambda a: reorder.striped(a, cp=2),
        "striped cp=4": lambda a: reorder.striped(a, cp=4),
        "striped cp=2 stripe 2": lambda a: reorder.striped(a, cp=2, stripe_size=2),
        "dual_chunk_swap cp=2": lambda a: reorder.dual_chunk_swap(a, cp=2),
    }[kind]
    return move(np.asarray(seg.ids)), move(np.asarray(seg.positions))


@pytest.mark.parametrize(
    "kind", ["striped cp=2", "striped cp=4", "striped cp=2 stripe 2", "dual_chunk_swap cp=2"]
)
def test_rows_reordered_for_context_parallelism_get_the_advice(kind):
    ids, pos = _striped_rows(kind)
    assert looks_reordered(ids[0], pos[0])
    message = _message(lambda: thdkit.validate_layout(ids, pos, max_segments_per_seq=3))
    assert CP_ADVICE in message and "ring_attention" in message, message
    one_document = reorder.dual_chunk_swap(np.arange(8)[None], cp=2)  # rule 6 only
    message = _message(
        lambda: thdkit.validate_layout(np.ones((1, 8), int), one_document, max_segments_per_seq=1)
    )
    assert "does not increase" in message and CP_ADVICE in message, message


# --- 7. Positions are optional: None numbers each document 0, 1, 2, ... -------------------------

IDS = np.array([[1, 1, 1, 0, 2, 2, 3, 3]])


@pytest.mark.parametrize("mask_type", ["padding", "no_mask", "padding_causal"])
def test_seqlens_and_offsets_without_positions_numbers_each_document(mask_type):
    kv_ids = np.array([[1, 1, 2, 2, 2, 0, 3, 0]])
    numbered = {a.tobytes(): thdkit.Segments.from_ids(a).positions for a in (IDS, kv_ids)}
    for wrap in (np.asarray, jnp.asarray):
        options = dict(mask_type=mask_type, max_segments_per_seq=3)
        got = thdkit.seqlens_and_offsets(
            segment_ids_q=wrap(IDS), segment_ids_kv=wrap(kv_ids), **options
        )
        want = thdkit.seqlens_and_offsets(
            segment_ids_q=IDS,
            segment_pos_q=numbered[IDS.tobytes()],
            segment_ids_kv=kv_ids,
            segment_pos_kv=numbered[kv_ids.tobytes()],
            **options,
        )
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mask_type", ["padding", "no_mask"])
def test_attention_without_positions_equals_attention_with_any_positions(mask_type):
    q = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
    options = dict(mask_type=mask_type, max_segments_per_seq=3, implementation="reference")
    without = thdkit.attention(q, q, q, segment_ids_q=IDS, **options)
    shuffled = np.array([[5, 0, 2, 9, 1, 1, 7, 3]])  # the padding and no_mask types read none
    np.testing.assert_allclose(
        without, thdkit.attention(q, q, q, segment_ids_q=IDS, segment_pos_q=shuffled, **options)
    )
    traced = jax.jit(lambda ids: thdkit.attention(q, q, q, segment_ids_q=ids, **options))(IDS)
    np.testing.assert_allclose(without, traced, atol=1e-6)


def test_positions_come_for_both_sides_or_neither():
    with pytest.raises(ValueError, match="segment_pos_kv was given without segment_pos_q"):
        thdkit.seqlens_and_offsets(
            segment_ids_q=IDS, segment_ids_kv=IDS, segment_pos_kv=IDS, max_segments_per_seq=3
        )
    with pytest.raises(ValueError, match="only segment_ids_kv was given"):
        thdkit.seqlens_and_offsets(
            segment_ids_q=IDS, segment_pos_q=IDS * 0, segment_ids_kv=IDS, max_segments_per_seq=3
        )
    with pytest.raises(TypeError, match="segment_ids_q is required"):
        thdkit.seqlens_and_offsets(segment_ids_q=None, max_segments_per_seq=3)


# --- 8. Segments built from Python lists --------------------------------------------------------


def test_plan_attention_on_segments_built_from_lists():
    from_lists = thdkit.Segments(ids=[[1, 1, 2]], positions=[[0, 1, 0]], lengths=[[2, 2, 1]])
    assert all(
        isinstance(a, np.ndarray) and a.dtype == np.int32 for a in jax.tree.leaves(from_lists)
    )
    arrays = thdkit.Segments.from_ids(np.array([[1, 1, 2]]))
    q = jax.random.normal(jax.random.key(1), (1, 3, 1, 4))
    outs = [
        thdkit.attention(
            q, q, q, plan=thdkit.plan_attention(s, mask_type="causal", max_segments_per_seq=2)
        )
        for s in (from_lists, arrays)
    ]
    np.testing.assert_array_equal(*outs)
    # Pytree utilities keep what they put in the fields (partition specs stay specs).
    specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(None, "cp"), arrays)
    assert specs.ids == jax.sharding.PartitionSpec(None, "cp")


def test_segments_fields_that_cannot_be_arrays_are_named():
    with pytest.raises(TypeError, match=r"Segments\.positions must be an integer array"):
        thdkit.Segments([[1, 1]], [[0.0, 1.0]], [[2, 2]])
    with pytest.raises(ValueError, match=r"Segments\.lengths must be a rectangular"):
        thdkit.Segments([[1, 1]], [[0, 1]], [[2, 2], [1]])
    odd = thdkit.Segments(((1, 1),), [[0, 1]], [[2, 2]])
    with pytest.raises(TypeError, match=r"q_segments\.ids must be a JAX or NumPy array"):
        thdkit.plan_attention(odd, mask_type="causal", max_segments_per_seq=1)


# --- 9. Messages name the caller's parameters --------------------------------------------------


def test_unpad_of_an_invalid_segments_names_segments():
    hole = thdkit.Segments([[1, 0, 1]], [[0, 0, 0]], [[1, 0, 1]])
    with pytest.raises(ValueError, match=r"^segments row 0, token 2: id 1 starts a second run"):
        thdkit.unpad(np.ones((1, 3)), hole)
    with pytest.raises(TypeError, match=r"^segments must be a thdkit\.Segments, integer"):
        thdkit.unpad(np.ones((1, 3)), np.ones((1, 3), np.float32))


def test_padding_id_minus_one_refuses_ids_that_would_wrap_when_shifted():
    with pytest.raises(ValueError, match=r"^segment_ids row 0, token 1: id 2147483647 exceeds"):
        thdkit.Segments.from_ids(np.array([[0, 2**31 - 1]]), padding_id=-1)
