"""thdkit.dot_product_attention against jax.nn.dot_product_attention itself, and on packed rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import thdkit

B, H = 2, 8


def _qkv(seed: int, *, t: int, s: int, n: int, k: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, t, n, H), dtype)
    kk = jax.random.normal(keys[1], (B, s, k, H), dtype)
    v = jax.random.normal(keys[2], (B, s, k, H), dtype)
    return q, kk, v


def _jax_nn_allowed(t, s, *, is_causal, q_len, kv_len, window) -> np.ndarray:
    """jax.nn's mask, bool[B, T, S]: index-based causal (top-left), window, right padding."""
    i, j = np.arange(t)[:, None], np.arange(s)[None, :]
    allowed = np.ones((B, t, s), bool)
    if is_causal:
        allowed &= j <= i
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        allowed &= (i - left <= j) & (j <= i + right)
    if q_len is not None:
        allowed &= np.arange(t)[None, :, None] < np.asarray(q_len)[:, None, None]
    if kv_len is not None:
        allowed &= np.arange(s)[None, None, :] < np.asarray(kv_len)[:, None, None]
    return allowed


def _outputs_and_grads(fns, live, *args):
    """Each function's output and the gradients of one loss over the live rows, in one jit."""

    def run(*args):
        results = []
        for fn in fns:

            def loss(*args, fn=fn):
                out = fn(*args)
                return jnp.sum(jnp.where(live, jnp.sin(out), 0.0)), out

            grads, out = jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
            results.append((out, *grads))
        return results

    return jax.jit(run)(*args)


# (T, S, N, K, is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size, impl):
# thdkit's dense reference checks the mapping of each option (compiles fast); the cases marked
# None run the default implementation (blockwise on a CPU, cuDNN where it can on a GPU).
GRID = {
    "self": (16, 16, 4, 4, False, None, None, None, "reference"),
    "self-causal": (16, 16, 4, 4, True, None, None, None, "reference"),
    "self-causal-lengths": (16, 16, 4, 4, True, [16, 9], [16, 9], None, "reference"),
    "self-kv-lengths": (16, 16, 4, 4, False, None, [5, 12], None, "reference"),
    "self-causal-window": (16, 16, 4, 4, True, None, None, (3, 0), "reference"),
    "self-window-both-sides": (16, 16, 4, 4, False, [14, 16], None, (2, 3), "reference"),
    "gqa-causal-lengths": (16, 16, 4, 2, True, [11, 16], [11, 16], None, None),
    "mqa-symmetric-window": (16, 16, 4, 1, False, None, None, 2, "reference"),
    "cross-kv-lengths": (16, 24, 4, 2, False, None, [20, 7], None, "reference"),
    "cross-causal-q-lengths": (16, 24, 4, 4, True, [10, 16], None, None, "reference"),
    "cross-causal-window-empty-rows": (24, 16, 4, 2, True, None, [16, 6], (4, 1), None),
}


@pytest.mark.parametrize("case", list(GRID), ids=list(GRID))
def test_matches_jax_nn_outputs_and_gradients(case):
    t, s, n, k, is_causal, q_len, kv_len, window, implementation = GRID[case]
    q, kk, v = _qkv(len(case), t=t, s=s, n=n, k=k)
    options = dict(
        is_causal=is_causal,
        query_seq_lengths=None if q_len is None else jnp.asarray(q_len, jnp.int32),
        key_value_seq_lengths=None if kv_len is None else jnp.asarray(kv_len, jnp.int32),
        local_window_size=window,
    )
    allowed = _jax_nn_allowed(t, s, is_causal=is_causal, q_len=q_len, kv_len=kv_len, window=window)
    # Rows with an allowed key agree; jax.nn gives the other rows (not past query_seq_lengths)
    # the mean of all values, thdkit zeros (see the docstring).
    live = jnp.asarray(allowed.any(-1))[:, :, None, None]
    if q_len is not None:
        past = np.arange(t)[None, :] >= np.asarray(q_len)[:, None]
        live = live | jnp.asarray(past)[:, :, None, None]

    def ours(q, kk, v):
        return thdkit.dot_product_attention(q, kk, v, implementation=implementation, **options)

    def theirs(q, kk, v):
        return jax.nn.dot_product_attention(q, kk, v, **options)

    (got, *grads), (want, *ref) = _outputs_and_grads((ours, theirs), live, q, kk, v)
    np.testing.assert_allclose(jnp.where(live, got, 0), jnp.where(live, want, 0), atol=2e-6)
    assert np.all(np.asarray(got)[~np.broadcast_to(np.asarray(live), got.shape)] == 0)
    for name, g, r in zip("qkv", grads, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5, err_msg=f"d{name}")


def test_unbatched_rank_3_as_jax_nn():
    q, k, v = (x[0] for x in _qkv(1, t=16, s=16, n=4, k=2))

    @jax.jit
    def both(q, k, v):
        ours = thdkit.dot_product_attention(q, k, v, is_causal=True, implementation="reference")
        return ours, jax.nn.dot_product_attention(q, k, v, is_causal=True)

    got, want = both(q, k, v)
    assert got.shape == (16, 4, H)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_bias_and_mask_dense_path_matches_jax_nn_with_gradients():
    q, k, v = _qkv(2, t=16, s=24, n=4, k=2)
    keys = jax.random.split(jax.random.key(3), 2)
    bias = jax.random.normal(keys[0], (B, 4, 16, 24))
    mask = jax.random.bernoulli(keys[1], 0.8, (B, 1, 16, 24)).at[..., 0].set(True)
    lengths = jnp.array([24, 13], jnp.int32)
    options = dict(mask=mask, is_causal=True, key_value_seq_lengths=lengths)

    def ours(q, k, v, bias):
        return thdkit.dot_product_attention(q, k, v, bias, **options)

    def theirs(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias, **options)

    (got, *grads), (want, *ref) = _outputs_and_grads((ours, theirs), True, q, k, v, bias)
    np.testing.assert_allclose(got, want, atol=2e-6)
    for name, g, r in zip(("q", "k", "v", "bias"), grads, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5, err_msg=f"d{name}")


# Two packed rows: documents of 5, 3 (then 2 padding tokens), 6 tokens; and 16 tokens in 4 docs.
IDS = np.array(
    [[1] * 5 + [2] * 3 + [0] * 2 + [3] * 6, [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4], np.int32
)


def _positions(ids: np.ndarray) -> np.ndarray:
    return np.asarray(thdkit.Segments.from_ids(ids).positions)


def _packed_allowed(ids_q, pos_q, ids_kv, pos_kv, *, is_causal, window=None) -> np.ndarray:
    """A dense masked reference's mask, written from docs/semantics.md: bool[B, T, S]."""
    same = (ids_q[:, :, None] == ids_kv[:, None, :]) & (ids_q[:, :, None] != 0)
    delta = pos_kv[:, None, :] - pos_q[:, :, None]
    if is_causal:
        same &= delta <= 0
    if window is not None:
        same &= (-window[0] <= delta) & (delta <= window[1])
    return same


@pytest.mark.parametrize(
    ("is_causal", "window", "implementation"), [(True, None, None), (False, (2, 1), "reference")]
)
def test_packed_rows_equal_a_dense_masked_reference(is_causal, window, implementation):
    q, k, v = _qkv(4, t=16, s=16, n=4, k=2)
    pos = _positions(IDS)
    allowed = _packed_allowed(IDS, pos, IDS, pos, is_causal=is_causal, window=window)
    live = jnp.asarray(allowed.any(-1))[:, :, None, None]
    plan = thdkit.plan_attention(
        thdkit.Segments.from_ids(IDS),
        mask_type="padding_causal" if is_causal else "padding",
        window_size=window,
        max_segments_per_seq=4,
        implementation=implementation,
    )

    def ours(q, k, v):
        return thdkit.dot_product_attention(
            q, k, v, is_causal=is_causal, local_window_size=window, segment_ids=IDS,
            implementation=implementation,
        )  # fmt: skip

    def planned(q, k, v):  # a plan made once, outside
        return thdkit.dot_product_attention(q, k, v, plan=plan)

    def dense(q, k, v):  # the dense path (mask all True) on the same plan
        return thdkit.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 16, 16), bool), plan=plan)

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(allowed)[:, None])

    # The default implementation (blockwise here) against the reference; the plan and the dense
    # path are checked on the reference case (one blockwise compilation is enough).
    fns = (ours, reference) if implementation is None else (ours, reference, planned, dense)
    results = _outputs_and_grads(fns, live, q, k, v)
    (got, *grads), (want, *ref) = results[:2]
    np.testing.assert_allclose(jnp.where(live, got, 0), jnp.where(live, want, 0), atol=2e-6)
    assert np.all(np.asarray(got)[IDS == 0] == 0)  # padding rows: zeros
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)
    for other in results[2:]:
        for x, y in zip(other, results[0], strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)


def test_packed_cross_attention_with_a_pair_of_layouts():
    q, k, v = _qkv(5, t=16, s=24, n=4, k=4)
    ids_kv = np.array([[1] * 10 + [2] * 6 + [3] * 8, [1] * 6 + [2] * 6 + [3] * 6 + [4] * 6])
    pos_q, pos_kv = _positions(IDS), _positions(ids_kv)
    allowed = _packed_allowed(IDS, pos_q, ids_kv, pos_kv, is_causal=True)
    live = jnp.asarray(allowed.any(-1))[:, :, None, None]

    @jax.jit
    def both(q, k, v):
        ours = thdkit.dot_product_attention(
            q, k, v, is_causal=True, segment_ids=(IDS, ids_kv),
            segment_positions=(pos_q, pos_kv), implementation="reference",
        )  # fmt: skip
        return ours, jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(allowed)[:, None])

    got, want = both(q, k, v)
    np.testing.assert_allclose(jnp.where(live, got, 0), jnp.where(live, want, 0), atol=2e-6)


def test_segment_ids_and_seq_lengths_combine():
    """query/key_value_seq_lengths cut packed rows: the tokens past the length are padding."""
    q, k, v = _qkv(6, t=16, s=16, n=4, k=2)
    lengths = jnp.array([12, 16], jnp.int32)
    cut = np.where(np.arange(16)[None, :] < np.asarray(lengths)[:, None], IDS, 0)

    @jax.jit
    def both(q, k, v):
        options = dict(is_causal=True, implementation="reference")
        got = thdkit.dot_product_attention(
            q, k, v, segment_ids=IDS, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            **options,
        )  # fmt: skip
        return got, thdkit.dot_product_attention(q, k, v, segment_ids=cut, **options)

    got, want = both(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_documents_and_non_finite_values_stay_isolated():
    """NaN in one document's values: every other row and every gradient it produces is
    bit-equal to the call without it, on the kernel path and on the dense path."""
    q, k, v = _qkv(7, t=16, s=16, n=4, k=2)
    doc2 = jnp.asarray(IDS == 2)[:, :, None, None]
    other = jnp.asarray((IDS != 2) & (IDS != 0))[:, :, None, None]

    @jax.jit
    def run(v):
        results = []
        for extra in ({}, {"mask": jnp.ones((1, 1, 16, 16), bool)}):

            def loss(v, extra=extra):
                out = thdkit.dot_product_attention(
                    q, k, v, is_causal=True, segment_ids=IDS, **extra
                )
                return jnp.sum(jnp.where(other, out, 0.0) ** 2), out

            results.append(jax.grad(loss, has_aux=True)(v))
        return results

    for (d_clean, clean), (d_dirty, dirty) in zip(
        run(v), run(jnp.where(doc2, jnp.nan, v)), strict=True
    ):
        np.testing.assert_array_equal(jnp.where(other, dirty, 0), jnp.where(other, clean, 0))
        assert bool(jnp.all(jnp.isnan(jnp.where(doc2, dirty, jnp.nan))))
        np.testing.assert_array_equal(jnp.where(doc2, 0.0, d_dirty), jnp.where(doc2, 0.0, d_clean))


def test_rows_with_no_allowed_key_give_zeros_where_jax_nn_averages():
    q, k, v = _qkv(8, t=4, s=4, n=2, k=2)
    lengths = jnp.array([0, 4], jnp.int32)  # row 0 has no key at all

    @jax.jit
    def both(q, k, v):
        options = dict(key_value_seq_lengths=lengths)
        ours = thdkit.dot_product_attention(q, k, v, implementation="reference", **options)
        return ours, jax.nn.dot_product_attention(q, k, v, **options)

    got, want = both(q, k, v)
    np.testing.assert_array_equal(got[0], 0)
    np.testing.assert_allclose(want[0], jnp.broadcast_to(v[0].mean(0), want[0].shape), atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], atol=2e-6)


def test_weights_function_matches_the_softmax_of_jax_nn_masks():
    q, k, _ = _qkv(9, t=16, s=16, n=4, k=2)
    allowed = _jax_nn_allowed(16, 16, is_causal=True, q_len=None, kv_len=None, window=(3, 0))

    @jax.jit
    def both(q, k):
        w = thdkit.dot_product_attention_weights(q, k, is_causal=True, local_window_size=(3, 0))
        logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(H)
        mask = jnp.asarray(allowed)[:, None]
        return w, jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)

    w, want = both(q, k)
    assert w.shape == (B, 4, 16, 16)
    np.testing.assert_allclose(w, want, atol=1e-6)


def test_implementation_names():
    q, k, v = _qkv(10, t=16, s=16, n=4, k=2)
    xla = thdkit.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    blockwise = thdkit.dot_product_attention(q, k, v, is_causal=True, implementation="blockwise")
    np.testing.assert_array_equal(xla, blockwise)
    reference = thdkit.dot_product_attention(q, k, v, is_causal=True, implementation="reference")
    np.testing.assert_allclose(reference, xla, atol=2e-6)
    with pytest.raises(ValueError, match="implementation must be one of"):
        thdkit.dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(NotImplementedError, match="bias and mask run the dense path"):
        thdkit.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 16, 16), bool),
                                     implementation="blockwise")  # fmt: skip
    if jax.default_backend() == "cpu":
        with pytest.raises(NotImplementedError, match="cudnn"):
            thdkit.dot_product_attention(q, k, v, implementation="cudnn")


def _bad(**kwargs):
    q, k, v = _qkv(11, t=16, s=16, n=4, k=2)
    return lambda: thdkit.dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (_bad(local_window_size=(-1, 2)), ValueError, "local_window_size left bound must be >= 0"),
        (_bad(local_window_size=(1.5, 2)), TypeError, "local_window_size left bound"),
        (_bad(local_window_size=(1, 2, 3)), ValueError, "local_window_size must be"),
        (_bad(query_seq_lengths=jnp.array([3])), ValueError, r"query_seq_lengths must .*\(2,\)"),
        (_bad(key_value_seq_lengths=jnp.array([3.0, 1.0])), TypeError, "key_value_seq_lengths"),
        (_bad(mask=jnp.ones((1, 1, 16, 16))), TypeError, "mask must be a boolean"),
        (_bad(mask=jnp.ones((1, 3, 16, 16), bool)), ValueError, "mask of shape"),
        (_bad(bias=jnp.ones((2, 2, 2, 16, 16))), ValueError, "bias must have at most 4"),
        (_bad(is_causal=1), TypeError, "is_causal must be a bool"),
        (_bad(segment_ids=IDS[:, :8]), ValueError, r"segment_ids has 8 tokens .* query has T = 16"),
        (_bad(segment_positions=IDS), ValueError, "segment_positions needs segment_ids"),
        (_bad(segment_ids=IDS, max_segments_per_seq=2), ValueError, "max_segments_per_seq=2"),
        (_bad(segment_ids=IDS, max_segments_per_seq=2.0), TypeError, "max_segments_per_seq"),
        (_bad(plan=object()), TypeError, "plan must be a thdkit.AttentionPlan"),
        (_bad(scale=float("nan"), mask=jnp.ones((16, 16), bool)), ValueError, "scale"),
    ],
)
def test_errors_name_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_plan_conflicts():
    q, k, v = _qkv(12, t=16, s=16, n=4, k=2)
    plan = thdkit.plan_attention(
        thdkit.Segments.from_ids(IDS), mask_type="padding", max_segments_per_seq=4
    )
    with pytest.raises(ValueError, match="do not pass segment_ids"):
        thdkit.dot_product_attention(q, k, v, plan=plan, segment_ids=IDS)
    with pytest.raises(ValueError, match="is_causal=True"):
        thdkit.dot_product_attention(q, k, v, plan=plan, is_causal=True)
    with pytest.raises(ValueError, match="fixes the implementation"):
        thdkit.dot_product_attention(q, k, v, plan=plan, implementation="xla")
    with pytest.raises(ValueError, match="plan's layout has shapes"):
        thdkit.dot_product_attention(q[:, :8], k[:, :8], v[:, :8], plan=plan)
