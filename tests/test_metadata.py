"""seqlens_and_offsets: the worked examples of docs/semantics.md, arguments, jit/vmap, flat form."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import thdkit
from thdkit._src.synth import packed_segments

METHODS = ["linear", "one_hot", "dense"]

# (mask_type, S, ids_q, pos_q, ids_kv, pos_kv, raw, compact); kv None = self-attention;
# raw/compact are (q_seqlens, q_offsets, kv_seqlens, kv_offsets).
WORKED_EXAMPLES = {
    "1-self": (
        "padding_causal", 4, [1, 1, 1, 2, 2, 0, 0, 3], [0, 1, 2, 0, 1, 2, 0, 0], None, None,
        ([3, 2, 1, 0], [0, 3, 7, -1, -1], [3, 2, 1, 0], [0, 3, 7, -1, -1]),
        ([3, 2, 1, 0], [0, 3, 7, -1, -1], [3, 2, 1, 0], [0, 3, 7, -1, -1]),
    ),
    "2-ring-step": (
        "padding_causal", 2, [1, 1, 2, 2], [0, 2, 0, 2], [1, 1, 2, 2], [1, 3, 1, 3],
        ([1, 1], [1, 3, -1], [1, 1], [0, 2, -1]),
        ([1, 1], [1, 3, -1], [1, 1], [0, 2, -1]),
    ),
    "3-cross-bottom-right": (
        "padding_causal_bottom_right", 2,
        [1, 1, 1, 0, 2, 2, 2, 2], [0, 1, 2, 3, 0, 1, 2, 3],
        [1, 1, 1, 1, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2], [0, 1, 2, 3, 4, 5, *range(10)],
        ([3, 4], [0, 4, -1], [4, 10], [0, 6, -1]),
        ([3, 4], [0, 4, -1], [4, 10], [0, 6, -1]),
    ),
    "3-cross-causal": (
        "padding_causal", 2,
        [1, 1, 1, 0, 2, 2, 2, 2], [0, 1, 2, 3, 0, 1, 2, 3],
        [1, 1, 1, 1, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2], [0, 1, 2, 3, 4, 5, *range(10)],
        ([3, 4], [0, 4, -1], [3, 4], [0, 6, -1]),
        ([3, 4], [0, 4, -1], [3, 4], [0, 6, -1]),
    ),
    "4-absent-segment": (
        "padding", 3, [1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 0, 1], [1, 1, 1, 3, 3, 0], [0, 1, 2, 0, 1, 0],
        ([2, 0, 2], [0, 4, -1, -1], [3, 0, 2], [0, 3, -1, -1]),
        ([2, 2, 0], [0, 4, -1, -1], [3, 2, 0], [0, 3, -1, -1]),
    ),
    "5-vanishing-segment": (
        "padding_causal", 3, [1, 1, 2, 2], [0, 1, 0, 1], [1, 1, 2, 2], [5, 6, 0, 1],
        ([0, 2, 0], [2, -1, -1, -1], [0, 2, 0], [2, -1, -1, -1]),
        ([2, 0, 0], [2, -1, -1, -1], [2, 0, 0], [2, -1, -1, -1]),
    ),
}  # fmt: skip


def _call(example, *, compact, method, **overrides):
    mask, num_segments, ids_q, pos_q, ids_kv, pos_kv, *_ = example
    kv = {}
    if ids_kv is not None:
        kv = dict(segment_ids_kv=jnp.array(ids_kv), segment_pos_kv=jnp.array(pos_kv))
    kwargs = dict(
        segment_ids_q=jnp.array(ids_q),
        segment_pos_q=jnp.array(pos_q),
        **kv,
        mask_type=mask,
        max_segments_per_seq=num_segments,
        compact=compact,
        method=method,
    )
    return thdkit.seqlens_and_offsets(**(kwargs | overrides))


@pytest.mark.parametrize("compact", [False, True], ids=["raw", "compact"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(WORKED_EXAMPLES))
def test_worked_examples(name, method, compact):
    example = WORKED_EXAMPLES[name]
    expected = example[7] if compact else example[6]
    meta = _call(example, compact=compact, method=method)
    got = (meta.q_seqlens, meta.q_offsets, meta.kv_seqlens, meta.kv_offsets)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == jnp.int32
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("method", METHODS)
def test_example_6_reused_id_raises(method):
    ids = jnp.array([1, 1, 0, 1, 2, 2])
    with pytest.raises(ValueError, match=r"segment_ids_q row 0, token 3: id 1 starts a second run"):
        thdkit.seqlens_and_offsets(
            segment_ids_q=ids, segment_pos_q=jnp.arange(6), max_segments_per_seq=2, method=method
        )


def test_kv_side_is_validated_and_named():
    with pytest.raises(ValueError, match=r"segment_pos_kv row 1, token 2: position 1 does not"):
        thdkit.seqlens_and_offsets(
            segment_ids_q=jnp.ones((2, 4), jnp.int32),
            segment_pos_q=jnp.tile(jnp.arange(4), (2, 1)),
            segment_ids_kv=jnp.ones((2, 3), jnp.int32),
            segment_pos_kv=jnp.array([[0, 1, 2], [0, 1, 1]]),
            max_segments_per_seq=1,
        )


def test_padding_masks_ignore_positions_order():
    # Positions only matter to causal types: a non-increasing run is fine for padding masks.
    meta = thdkit.seqlens_and_offsets(
        segment_ids_q=jnp.array([1, 1, 1]),
        segment_pos_q=jnp.array([2, 0, 1]),
        mask_type="padding",
        max_segments_per_seq=1,
    )
    np.testing.assert_array_equal(meta.q_seqlens, [3])


_STATIC = ("mask_type", "max_segments_per_seq", "compact", "method")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mask_type", ["padding", "causal", "causal_bottom_right"])
def test_jit_and_vmap_match_eager(method, mask_type):
    ids, pos = packed_segments(np.random.default_rng(3), batch=3, seq_len=64, max_segments=5)
    kwargs = dict(mask_type=mask_type, max_segments_per_seq=6, method=method)
    eager = thdkit.seqlens_and_offsets(segment_ids_q=ids, segment_pos_q=pos, **kwargs)
    jitted = jax.jit(thdkit.seqlens_and_offsets, static_argnames=_STATIC)(
        segment_ids_q=ids, segment_pos_q=pos, **kwargs
    )
    per_row = jax.vmap(
        lambda i, p: thdkit.seqlens_and_offsets(segment_ids_q=i, segment_pos_q=p, **kwargs)
    )(jnp.asarray(ids), jnp.asarray(pos))
    for a, b, c in zip(eager, jitted, per_row, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_extra_leading_dims_and_int_dtypes():
    ids, pos = packed_segments(np.random.default_rng(4), batch=6, seq_len=32, max_segments=4)
    flat = thdkit.seqlens_and_offsets(segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=4)
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        nested = thdkit.seqlens_and_offsets(
            segment_ids_q=ids.reshape(2, 3, 32).astype(dtype),
            segment_pos_q=pos.reshape(2, 3, 32).astype(dtype),
            max_segments_per_seq=4,
        )
        for a, b in zip(flat, nested, strict=True):
            assert b.dtype == jnp.int32
            assert b.shape[:2] == (2, 3)
            np.testing.assert_array_equal(a, b.reshape(6, -1))


def test_layout_error_in_nested_batch_names_the_row():
    ids = np.ones((2, 3, 4), np.int32)
    ids[1, 2, 2] = 0  # a hole: token 3 then starts a second run of id 1
    with pytest.raises(ValueError, match=r"row \(1, 2\), token 3"):
        thdkit.seqlens_and_offsets(
            segment_ids_q=ids, segment_pos_q=np.broadcast_to(np.arange(4), ids.shape),
            max_segments_per_seq=1,
        )  # fmt: skip


def test_flat_form():
    meta = thdkit.seqlens_and_offsets(
        segment_ids_q=jnp.array([[1, 1, 1, 2, 2, 0, 0, 3], [1, 1, 0, 0, 0, 0, 0, 0]]),
        segment_pos_q=jnp.array([[0, 1, 2, 0, 1, 2, 0, 0], [0, 1, 2, 3, 0, 0, 0, 0]]),
        max_segments_per_seq=3,
    )
    flat = meta.flat(seq_len_q=8)
    np.testing.assert_array_equal(flat.cu_seqlens_q, [0, 3, 5, 6, 8, 8, 8])
    np.testing.assert_array_equal(flat.q_starts, [0, 3, 7, 8, -1, -1])
    np.testing.assert_array_equal(flat.kv_starts, flat.q_starts)
    with pytest.raises(ValueError, match="one batch dim"):
        thdkit.SeqMeta(*(a.reshape(1, *a.shape) for a in meta)).flat(seq_len_q=8)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(seq_len_q=8.0), TypeError, r"seq_len_q must be an int, got float"),
        (dict(seq_len_q=True), TypeError, r"seq_len_q must be an int, got bool"),
        (dict(seq_len_q=jnp.int32(8)), TypeError, r"seq_len_q must be an int, got"),
        (dict(seq_len_q=0), ValueError, r"seq_len_q must be in \[1, 1073741824\], got 0"),
        (dict(seq_len_q=-8), ValueError, r"seq_len_q must be in \[1, "),
        (dict(seq_len_q=2**30 + 1), ValueError, r"seq_len_q must be in \[1, 1073741824\]"),
        (dict(seq_len_q=8, seq_len_kv=0), ValueError, r"seq_len_kv must be in \[1, "),
        (dict(seq_len_q=8, seq_len_kv="8"), TypeError, r"seq_len_kv must be an int, got str"),
        (dict(seq_len_q=7), ValueError, r"seq_len_q=7 is shorter than row 0's q segments, which end at 8"),
        (dict(seq_len_q=8, seq_len_kv=5), ValueError, r"seq_len_kv=5 is shorter than row 0's kv segments, which end at 8"),
        (dict(seq_len_q=2**30), ValueError, r"seq_len_q=1073741824 with 2 rows gives 2147483648 flattened tokens, beyond int32"),
    ],
)  # fmt: skip
def test_flat_form_checks_its_lengths(kwargs, error, pattern):
    meta = thdkit.seqlens_and_offsets(
        segment_ids_q=jnp.array([[1, 1, 1, 2, 2, 0, 0, 3], [1, 1, 2, 2, 2, 2, 2, 2]]),
        segment_pos_q=jnp.array([[0, 1, 2, 0, 1, 2, 0, 0], [0, 1, 0, 1, 2, 3, 4, 5]]),
        max_segments_per_seq=3,
    )
    with pytest.raises(error, match=pattern):
        meta.flat(**kwargs)


def test_flat_form_accepts_numpy_ints_and_gives_int32():
    meta = thdkit.SeqMeta(
        np.array([[3, 2]], np.int64), np.array([[3, 2]], np.int64),
        np.array([[0, 3, -1]], np.int64), np.array([[0, 3, -1]], np.int64),
    )  # fmt: skip
    flat = meta.flat(seq_len_q=np.int64(8), seq_len_kv=np.int16(5))
    assert all(a.dtype == jnp.int32 for a in flat)
    np.testing.assert_array_equal(flat.kv_starts, [0, 3])
    # Traced metadata: only the static checks apply.
    jitted = jax.jit(lambda m: m.flat(seq_len_q=4))(meta)
    np.testing.assert_array_equal(jitted.cu_seqlens_q, [0, 3, 5])


def test_seqmeta_is_a_pytree():
    meta = _call(WORKED_EXAMPLES["1-self"], compact=True, method="linear")
    assert len(jax.tree.leaves(meta)) == 4
    doubled = jax.tree.map(lambda a: 2 * a, meta)
    np.testing.assert_array_equal(doubled.q_seqlens, 2 * meta.q_seqlens)


# --- bad arguments -------------------------------------------------------------------------

_IDS = jnp.array([1, 1, 2, 2])
_POS = jnp.array([0, 1, 0, 1])


def _args(**overrides):
    args = dict(segment_ids_q=_IDS, segment_pos_q=_POS, max_segments_per_seq=2)
    args.update(overrides)
    return {k: v for k, v in args.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        (dict(segment_ids_q=_IDS.astype(jnp.float32)), TypeError, r"segment_ids_q must be an integer array, got dtype float32"),
        (dict(segment_pos_q=_POS > 0), TypeError, r"segment_pos_q must be an integer array, got dtype bool"),
        (dict(segment_ids_q=jnp.int32(1), segment_pos_q=jnp.int32(0)), ValueError, r"segment_ids_q must be at least 1-D"),
        (dict(segment_pos_q=jnp.zeros(5, jnp.int32)), ValueError, r"segment_ids_q and segment_pos_q must have the same shape, got \(4,\) and \(5,\)"),
        (dict(segment_ids_kv=_IDS), ValueError, r"only segment_ids_kv was given"),
        (dict(segment_pos_kv=_POS), ValueError, r"only segment_pos_kv was given"),
        (dict(segment_ids_kv=jnp.ones((2, 4), jnp.int32), segment_pos_kv=jnp.zeros((2, 4), jnp.int32)), ValueError, r"same batch dims, got \(\) and \(2,\)"),
        (dict(max_segments_per_seq=0), ValueError, r"max_segments_per_seq must be in \[1, 1073741823\], got 0"),
        (dict(max_segments_per_seq=-3), ValueError, r"max_segments_per_seq must be in \[1, "),
        (dict(max_segments_per_seq=2**31 - 1), ValueError, r"max_segments_per_seq must be in \[1, 1073741823\], got 2147483647"),
        (dict(max_segments_per_seq=2.0), TypeError, r"max_segments_per_seq must be a static Python int"),
        (dict(max_segments_per_seq=True), TypeError, r"max_segments_per_seq must be a static Python int"),
        (dict(max_segments_per_seq=_DROP), TypeError, r"max_segments_per_seq"),
        (dict(max_segments_per_seq=1), ValueError, r"segment_ids_q row 0, token 2: id 2 exceeds max_segments_per_seq=1"),
        (dict(mask_type="causal_top_left"), ValueError, r"unknown mask_type 'causal_top_left'; valid names: .*bottom_right_causal.*padding_causal"),
        (dict(mask_type=3), TypeError, r"mask_type must be a thdkit.MaskType or its name, got int"),
        (dict(method="cumsum"), ValueError, r"unknown method 'cumsum'; valid: linear, one_hot, dense"),
        (dict(compact="yes"), TypeError, r"compact must be a bool, got str"),
        (dict(compact=1), TypeError, r"compact must be a bool, got int"),
        (dict(method=["linear"]), TypeError, r"method must be a string \(one of linear, one_hot, dense\), got list"),
        (dict(segment_pos_q=jnp.array([0, 1, 0, 2**30])), ValueError, r"segment_pos_q row 0, token 3: position 1073741824 exceeds thdkit.MAX_POSITION"),
        (dict(segment_ids_q=[[1, 1], [2]], segment_pos_q=[[0, 1], [0]]), ValueError, r"segment_ids_q must be a rectangular integer array"),
        (dict(segment_ids_q=[1, 1, 2, None]), TypeError, r"segment_ids_q must be an integer array, got an object array of non-integers"),
        (dict(segment_ids_q=[1, 1, 2, 2**33]), ValueError, r"segment_ids_q row 0, token 3: id 8589934592 is outside the int32 range"),
        (dict(segment_ids_q=jnp.zeros((1, 0), jnp.int32), segment_pos_q=jnp.zeros((1, 0), jnp.int32)), ValueError, r"at least one token"),
    ],
)  # fmt: skip
def test_bad_arguments(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        thdkit.seqlens_and_offsets(**_args(**overrides))


@pytest.mark.parametrize("compact", [np.bool_(True), np.bool_(False)])
def test_numpy_bool_compact(compact):
    meta = thdkit.seqlens_and_offsets(**_args(compact=compact))
    raw = thdkit.seqlens_and_offsets(**_args(compact=bool(compact)))
    for a, b in zip(meta, raw, strict=True):
        np.testing.assert_array_equal(a, b)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        thdkit.seqlens_and_offsets(_IDS, _POS, max_segments_per_seq=2)  # type: ignore[misc]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 8)])
def test_empty_batch(method, shape):
    empty = np.zeros(shape, np.int32)
    meta = thdkit.seqlens_and_offsets(
        segment_ids_q=empty, segment_pos_q=empty, segment_ids_kv=np.zeros((*shape[:-1], 5), np.int32),
        segment_pos_kv=np.zeros((*shape[:-1], 5), np.int32), max_segments_per_seq=2,
        mask_type="causal", method=method,
    )  # fmt: skip
    assert [a.shape for a in meta] == [(*shape[:-1], 2)] * 2 + [(*shape[:-1], 3)] * 2
    assert all(a.dtype == jnp.int32 for a in meta)
    if len(shape) == 2:
        flat = meta.flat(seq_len_q=8, seq_len_kv=5)
        np.testing.assert_array_equal(flat.cu_seqlens_q, [0])
        assert flat.q_starts.shape == (0,)


def test_vmap_skips_value_checks_and_check_layout_catches_them():
    ids, pos = jnp.array([[1, 0, 1, 2], [1, 1, 2, 2]]), jnp.array([[0, 1, 0, 1]] * 2)

    def plain(i, p):
        return thdkit.seqlens_and_offsets(segment_ids_q=i, segment_pos_q=p, max_segments_per_seq=2)

    def checked(i, p):
        thdkit.check_layout(i, p, max_segments_per_seq=2, name="segment_ids_q")
        return plain(i, p)

    # Eagerly the invalid row raises; inside vmap the values are traced and are not checked ...
    with pytest.raises(ValueError, match=r"segment_ids_q row 0, token 2: id 1 starts a second run"):
        plain(ids, pos)
    jax.vmap(plain)(ids, pos)
    # ... unless checked with check_layout and checkify.
    err, meta = checkify.checkify(jax.vmap(checked))(ids, pos)
    assert "segment_ids_q: invalid layout in row 0, token 2: code 3" in err.get()
    np.testing.assert_array_equal(meta.q_seqlens[1], [2, 2])


def test_traced_inputs_skip_value_checks_but_not_shape_checks():
    fn = jax.jit(functools.partial(thdkit.seqlens_and_offsets, max_segments_per_seq=2))
    # An invalid layout under jit is not detected here (see check_layout) ...
    fn(segment_ids_q=jnp.array([1, 0, 1, 2]), segment_pos_q=_POS)
    # ... but dtype and shape problems still raise at trace time.
    with pytest.raises(TypeError, match="integer array"):
        fn(segment_ids_q=_IDS.astype(jnp.float32), segment_pos_q=_POS)
