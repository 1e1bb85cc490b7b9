"""thdkit.unpad / thdkit.pad against hand-written NumPy oracles of FlashAttention's and Hugging
Face's varlen helpers.

Hugging Face's own helper (``transformers.modeling_flash_attention_utils``) imports torch at module
level, and torch does not install light here, so its rule (a document starts where the position
id is 0, over the flattened axis) is transcribed into NumPy below instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import thdkit
from thdkit._src import synth

B, T, S = 3, 32, 4


def _oracle(x: np.ndarray, ids: np.ndarray):
    """unpad by loops: tokens with id != 0 in row-major order; a document is a run of an id."""
    tokens, indices, starts = [], [], []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[b, t] == 0:
                continue
            if t == 0 or ids[b, t - 1] != ids[b, t]:
                starts.append(len(tokens))
            tokens.append(x[b, t])
            indices.append(b * ids.shape[1] + t)
    cu = np.array([*starts, len(tokens)], np.int32)
    return np.array(tokens), np.array(indices, np.int32), cu, int(np.diff(cu).max(initial=0))


def _fa_unpad_input(x: np.ndarray, attention_mask: np.ndarray):
    """flash_attn.bert_padding.unpad_input: one sequence a row, cu_seqlens [B + 1] (an empty
    row a zero-length entry)."""
    seqlens = attention_mask.sum(-1).astype(np.int32)
    indices = np.flatnonzero(attention_mask.reshape(-1))
    cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    return x.reshape(-1, *x.shape[2:])[indices], indices, cu, int(seqlens.max(initial=0))


def _fa_unpad_concatenated(x: np.ndarray, attention_mask_in_length: np.ndarray):
    """flash_attn.bert_padding.unpad_input_for_concatenated_sequences: row b holds documents of
    lengths attention_mask_in_length[b, :k] from its start, then padding."""
    length = attention_mask_in_length.sum(-1)
    mask = np.arange(x.shape[1])[None, :] < length[:, None]
    seqlens = attention_mask_in_length.reshape(-1)
    seqlens = seqlens[seqlens != 0]
    indices = np.flatnonzero(mask.reshape(-1))
    cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    return x.reshape(-1, *x.shape[2:])[indices], indices, cu, int(seqlens.max())


def _hf_cu_seqlens_from_position_ids(position_ids: np.ndarray):
    """transformers' prepare_fa_kwargs_from_position_ids: starts where the flattened position
    is 0, then the total; max_seqlen the largest difference."""
    flat = position_ids.reshape(-1)
    cu = np.concatenate([np.flatnonzero(flat == 0), [flat.size]]).astype(np.int32)
    return cu, int(np.diff(cu).max())


def _check(got: thdkit.Unpadded, want) -> None:
    tokens, indices, cu, max_seqlen = want
    np.testing.assert_array_equal(got.x, tokens)
    np.testing.assert_array_equal(got.indices, indices)
    np.testing.assert_array_equal(got.cu_seqlens, cu)
    assert got.cu_seqlens.dtype == jnp.int32 and got.indices.dtype == jnp.int32
    assert got.max_seqlen == max_seqlen and isinstance(got.max_seqlen, int)


@pytest.mark.parametrize("seed", range(3))
def test_unpad_and_pad_match_the_oracle(seed):
    rng = np.random.default_rng(seed)
    ids, pos = synth.packed_segments(rng, batch=B, seq_len=T, max_segments=S)
    x = rng.standard_normal((B, T, 2, 3)).astype(np.float32)
    got = thdkit.unpad(x, thdkit.Segments.from_ids(ids, pos))
    _check(got, _oracle(x, ids))
    np.testing.assert_array_equal(
        thdkit.pad(got.x, got.indices, B, T), np.where((ids != 0)[..., None, None], x, 0)
    )


def test_readme_row_document_3_starts_after_the_padding_it_skips():
    """The padded-offset trap: SeqMeta.flat puts document 3 at offset 7 of the padded axis (the
    TE/cuDNN form); FlashAttention's contiguous cu_seqlens put it at 5, where unpad moved it."""
    ids = np.array([[1, 1, 1, 2, 2, 0, 0, 3]])
    pos = np.array([[0, 1, 2, 0, 1, 2, 0, 0]])
    x = np.arange(8.0, dtype=np.float32).reshape(1, 8, 1) + 10
    got = thdkit.unpad(x, thdkit.Segments.from_ids(ids, pos))
    np.testing.assert_array_equal(got.cu_seqlens, [0, 3, 5, 6])
    assert float(got.x[5, 0]) == 17.0  # token 7 of the row, the whole of document 3
    flat = thdkit.seqlens_and_offsets(
        segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=4
    ).flat(seq_len_q=8)
    np.testing.assert_array_equal(flat.cu_seqlens_q, [0, 3, 5, 6, 6])
    assert int(flat.q_starts[2]) == 7  # padded axis: x.reshape(-1)[5] would be padding


def test_matches_flash_attention_unpad_input_for_attention_masks():
    rng = np.random.default_rng(3)
    lengths = np.array([T, 5, 17])
    mask = np.arange(T)[None, :] < lengths[:, None]
    mask[1] = mask[1][::-1]  # left padding in row 1
    x = rng.standard_normal((B, T, 4)).astype(np.float32)
    _check(thdkit.unpad(x, jnp.asarray(mask)), _fa_unpad_input(x, mask))
    for empty in range(B):  # an all-padding row keeps its (zero-length) entry
        holed = mask.copy()
        holed[empty] = False
        _check(thdkit.unpad(x, holed), _fa_unpad_input(x, holed))
        _check(thdkit.unpad(x, holed.astype(np.int64)), _fa_unpad_input(x, holed))


def test_matches_flash_attention_unpad_for_concatenated_sequences():
    rng = np.random.default_rng(4)
    in_length = np.zeros((B, T), np.int64)
    in_length[0, :3] = [5, 9, 2]
    in_length[1, :1] = [T]
    in_length[2, :4] = [1, 1, 7, 3]
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        edges = np.cumsum(in_length[b][in_length[b] > 0])
        for k, (lo, hi) in enumerate(zip([0, *edges[:-1]], edges, strict=True)):
            ids[b, lo:hi] = k + 1
    x = rng.standard_normal((B, T, 4)).astype(np.float32)
    _check(thdkit.unpad(x, ids), _fa_unpad_concatenated(x, in_length))


@pytest.mark.parametrize("fall_back", [False, True])
def test_position_ids_give_hugging_face_cu_seqlens(fall_back):
    """Hugging Face's flattened rows (DataCollatorWithFlattening): B = 1, positions restart at 0
    (with fall_back, also fall back inside documents without reaching 0: no new document)."""
    lengths = [7, 1, 12, 4, 8]
    position_ids = np.concatenate([np.arange(n) for n in lengths])[None]
    if fall_back:
        position_ids[0, 10:13] = [3, 2, 1]
    x = np.arange(position_ids.size, dtype=np.float32).reshape(1, -1, 1)
    got = thdkit.unpad(x, thdkit.Segments.from_positions(position_ids))
    cu, max_seqlen = _hf_cu_seqlens_from_position_ids(position_ids)
    np.testing.assert_array_equal(got.cu_seqlens, cu)
    assert got.max_seqlen == max_seqlen
    np.testing.assert_array_equal(got.x[:, 0], x[0, :, 0])  # no padding: every token, in order


def test_under_jit_with_a_capacity():
    rng = np.random.default_rng(5)
    ids, pos = synth.packed_segments(rng, batch=B, seq_len=T, max_segments=S)
    x = rng.standard_normal((B, T, 3)).astype(np.float32)
    tokens, indices, cu, max_seqlen = _oracle(x, ids)
    n, docs = len(tokens), len(cu) - 1

    @jax.jit
    def run(x, ids, pos):
        return thdkit.unpad(x, thdkit.Segments.from_ids(ids, pos), capacity=B * T)

    got = run(x, ids, pos)
    assert got.x.shape == (B * T, 3) and got.cu_seqlens.shape == (B * T + 1,)
    np.testing.assert_array_equal(got.x[:n], tokens)
    np.testing.assert_array_equal(got.x[n:], 0)
    np.testing.assert_array_equal(got.indices[:n], indices)
    np.testing.assert_array_equal(got.indices[n:], B * T)
    np.testing.assert_array_equal(got.cu_seqlens[: docs + 1], cu)
    np.testing.assert_array_equal(got.cu_seqlens[docs + 1 :], n)  # empty documents
    assert int(got.max_seqlen) == max_seqlen
    padded = jax.jit(thdkit.pad, static_argnums=(2, 3))(got.x, got.indices, B, T)
    np.testing.assert_array_equal(padded, np.where((ids != 0)[..., None], x, 0))
    small = jax.jit(
        lambda ids: thdkit.unpad(x, ids, capacity=B * T, max_segments_per_seq=S).cu_seqlens
    )
    assert small(ids).shape == (B * S + 1,)
    np.testing.assert_array_equal(small(ids)[: docs + 1], cu)
    np.testing.assert_array_equal(small(ids)[docs + 1 :], n)


def test_max_documents_is_deprecated_for_max_segments_per_seq():
    """max_documents (the sequences of the batch) warns, naming the new keyword, and B*S of it
    is max_segments_per_seq=S, eagerly and under jit; both together are a TypeError."""
    rng = np.random.default_rng(7)
    ids, _ = synth.packed_segments(rng, batch=B, seq_len=T, max_segments=S)
    x = rng.standard_normal((B, T, 2)).astype(np.float32)
    for capacity in (None, B * T):
        want = thdkit.unpad(x, ids, capacity=capacity, max_segments_per_seq=S)
        with pytest.warns(DeprecationWarning, match=r"max_documents.*max_segments_per_seq=S"):
            got = thdkit.unpad(x, ids, capacity=capacity, max_documents=B * S)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    with pytest.warns(DeprecationWarning, match="max_documents"):
        traced = jax.jit(lambda i: thdkit.unpad(x, i, capacity=B * T, max_documents=B * S))(ids)
    want = jax.jit(lambda i: thdkit.unpad(x, i, capacity=B * T, max_segments_per_seq=S))(ids)
    for g, w in zip(traced, want, strict=True):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(TypeError, match="max_segments_per_seq or max_documents"):
        thdkit.unpad(x, ids, max_segments_per_seq=S, max_documents=B * S)


def test_gradients_flow_through_unpad_and_pad():
    ids = np.array([[1, 1, 0, 2], [0, 3, 3, 3]])
    x = jnp.arange(8.0).reshape(2, 4)

    def loss(x):
        u = thdkit.unpad(x, ids)
        return jnp.sum(thdkit.pad(u.x * u.x, u.indices, 2, 4))

    np.testing.assert_array_equal(jax.grad(loss)(x), np.where(ids != 0, 2 * x, 0))


def test_attention_on_the_varlen_form_equals_attention_on_packed_rows():
    """The gathered tokens as one row of documents (from cu_seqlens) attend as the packed rows."""
    rng = np.random.default_rng(6)
    ids, pos = synth.packed_segments(rng, batch=2, seq_len=T, max_segments=S)
    q, k, v = (jnp.asarray(rng.standard_normal((2, T, 2, 8)), jnp.float32) for _ in range(3))
    segments = thdkit.Segments.from_ids(ids, pos)
    options = dict(mask_type="padding_causal", implementation="reference")
    packed = thdkit.attention(
        q, k, v, plan=thdkit.plan_attention(segments, max_segments_per_seq=S, **options)
    )
    uq, uk, uv = (thdkit.unpad(a, segments) for a in (q, k, v))
    n = uq.x.shape[0]
    row = thdkit.Segments.from_cu_seqlens(uq.cu_seqlens, total_len=n)
    plan = thdkit.plan_attention(row, max_segments_per_seq=len(uq.cu_seqlens) - 1, **options)
    varlen = thdkit.attention(uq.x[None], uk.x[None], uv.x[None], plan=plan)[0]
    np.testing.assert_allclose(thdkit.pad(varlen, uq.indices, 2, T), packed, atol=1e-6)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: thdkit.unpad(np.ones((2, 4)), np.ones((2, 4)) * 0.5), TypeError, "segments"),
        (lambda: thdkit.unpad(np.ones((2, 5)), np.ones((2, 4), int)), ValueError, "leading dims"),
        (lambda: thdkit.unpad(np.ones((2, 4)), np.ones(4, int)), ValueError, r"\[B, T\]"),
        (lambda: thdkit.unpad(np.ones((1, 4)), [[1, 1, 0, 1]]), ValueError, "segments row 0"),
        (lambda: thdkit.unpad(np.ones((1, 4)), [[1, 1, 0, 2]], capacity=2), ValueError, "capacity"),
        (
            lambda: thdkit.unpad(np.ones((1, 4)), [[1, 1, 0, 2]], max_segments_per_seq=1),
            ValueError,
            "max_segments_per_seq=1 is below the 2 documents of segments row 0",
        ),
        (
            lambda: thdkit.unpad(np.ones((1, 4)), [[1, 1, 0, 2]], max_segments_per_seq=0),
            ValueError,
            "max_segments_per_seq",
        ),
        (
            lambda: thdkit.unpad(np.ones((1, 4)), [[1, 1, 0, 2]], max_segments_per_seq=2.0),
            TypeError,
            "max_segments_per_seq",
        ),
        (
            lambda: thdkit.unpad(np.ones((1, 4)), [[1, 1, 0, 2]], capacity=2.0),
            TypeError,
            "capacity",
        ),
        (
            lambda: jax.jit(lambda ids: thdkit.unpad(np.ones((1, 4)), ids))(jnp.ones((1, 4), int)),
            ValueError,
            "pass capacity",
        ),
        (lambda: thdkit.pad(np.ones(3), np.array([0.0, 1.0, 2.0]), 1, 4), TypeError, "indices"),
        (lambda: thdkit.pad(np.ones(3), np.array([0, 1]), 1, 4), ValueError, "indices must be"),
        (lambda: thdkit.pad(np.ones(3), np.array([0, 1, 2]), 1, 0), ValueError, "seq_len"),
    ],
)
def test_errors_name_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()
