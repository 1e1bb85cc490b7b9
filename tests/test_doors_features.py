"""Soft-capped logits and attention sinks through the doors: ``thdkit.dot_product_attention``
(the kernel path and the dense path of ``bias`` / ``mask``), ``dot_product_attention_weights``,
``thdkit.flax.make_attention_fn`` and ``PackedSelfAttention`` (off and on a mesh).

Each is held against the float64 oracle of tests/harness.py (docs/semantics.md, "Soft-capped
logits" and "Attention sinks"), forward and gradients (dq, dk, dv, d sinks and
d bias), under ``jit``. A row with no allowed key outputs zeros and gives the sinks no gradient;
a NaN in one document reaches no other row's output or gradient, nor the sinks'. Errors name
the parameter; ``implementation="cudnn"`` refuses both features, saying why.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

import thdkit
from thdkit._src import reorder
from thdkit.flax import PackedSelfAttention, make_attention_fn
from thdkit.flax.plumbing import attend

from .harness import dense_oracle

B, T, N, K, H = 2, 8, 4, 2, 8
CAP = 2.0
SCALE = 1.0  # logits of spread ~3: the cap of 2 changes them a lot
SINKS = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
# Three documents and padding in row 0 (padding rows have no allowed key), two in row 1.
IDS = np.array([[1, 1, 1, 2, 2, 0, 0, 3], [1, 1, 1, 1, 2, 2, 2, 2]], np.int32)
POS = np.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 0, 1, 2, 3]], np.int32)
FEATURES = {"cap": (CAP, False), "sinks": (None, True), "both": (CAP, True)}
TOL = dict(atol=2e-5, rtol=2e-5)


def _inputs(seed: int = 0, *, heads: tuple[int, int] = (N, K), dim: int = H):
    rng = np.random.default_rng(seed)
    n, k = heads
    q = rng.standard_normal((B, T, n, dim)).astype(np.float32)
    kk = rng.standard_normal((B, T, k, dim)).astype(np.float32)
    v = rng.standard_normal((B, T, k, dim)).astype(np.float32)
    w = rng.standard_normal((B, T, n, dim)).astype(np.float32)
    return q, kk, v, w


def _allowed(ids: np.ndarray = IDS, pos: np.ndarray = POS) -> np.ndarray:
    """bool[B, T, T]: same document, not padding, causal inside the document."""
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0)
    return same & (pos[:, :, None] >= pos[:, None, :])


def oracle(q, k, v, w, allowed, *, scale, cap=None, sinks=None, bias=None):
    """float64 ``(out, weights, (dq, dk, dv, d_sinks, d_bias))`` of ``sum(out * w)``: the
    oracle of tests/harness.py (:func:`dense_oracle`) over the keys ``allowed`` [B, T, S] or
    [B, N, T, S] admits, ``d_sinks`` None without sinks, ``d_bias`` the logits' gradient."""
    want = dense_oracle(
        q, k, v, allowed, w_out=w, scale=scale, logits_soft_cap=cap, sinks=sinks, bias=bias
    )
    dq, dk, dv, *d_sinks = want.grads
    return want.out, want.weights, (dq, dk, dv, d_sinks[0] if d_sinks else None, want.d_logits)


def _close(got, want, what: str) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **TOL, err_msg=what)


def _grads(fn, q, k, v, w, sinks, bias=None):
    """jit: the output and the gradients of ``sum(out * w)``: ``{"dq", "dk", "dv"}``, and
    ``"d_sinks"`` / ``"d_bias"`` where they are given."""
    args = dict(q=q, k=k, v=v, sinks=sinks, bias=bias)
    wrt = {name: x for name, x in args.items() if x is not None}

    def loss(wrt):
        out = fn(**{**args, **wrt})
        return jnp.sum(out * w), out

    grads, out = jax.jit(jax.grad(loss, has_aux=True))(wrt)
    return out, {f"d{'_' if len(n) > 1 else ''}{n}": g for n, g in grads.items()}


def _check(out, grads, want, *, what: str) -> None:
    """Output and every gradient computed against the oracle's."""
    w_out, _, (dq, dk, dv, d_sinks, d_bias) = want
    _close(out, w_out, f"{what}: out")
    refs = dict(dq=dq, dk=dk, dv=dv, d_sinks=d_sinks, d_bias=d_bias)
    for name, got in grads.items():
        _close(got, refs[name], f"{what}: {name}")


# --- dot_product_attention: the kernel path --------------------------------------------------


# The reference with each feature alone and both; the default (blockwise on a CPU) with both.
@pytest.mark.parametrize(
    ("implementation", "feature"), [*(("reference", f) for f in FEATURES), (None, "both")]
)
def test_kernel_path_matches_the_oracle(implementation, feature):
    cap, with_sinks = FEATURES[feature]
    q, k, v, w = _inputs(1)
    sinks = jnp.asarray(SINKS) if with_sinks else None

    def fn(q, k, v, sinks, bias):
        return thdkit.dot_product_attention(
            q, k, v, scale=SCALE, is_causal=True, segment_ids=IDS, segment_positions=POS,
            implementation=implementation, logits_soft_cap=cap, sinks=sinks,
        )  # fmt: skip

    out, grads = _grads(fn, q, k, v, w, sinks)
    assert ("d_sinks" in grads) == with_sinks
    want = oracle(q, k, v, w, _allowed(), scale=SCALE, cap=cap, sinks=sinks)
    _check(out, grads, want, what=f"{implementation}, {feature}")
    # Padding rows have no allowed key: zeros, whatever the sink.
    np.testing.assert_array_equal(np.asarray(out)[0, 5:7], 0.0)


# --- dot_product_attention: the dense path (bias, mask) --------------------------------------


@pytest.mark.parametrize("feature", FEATURES)
def test_dense_path_matches_the_oracle(feature):
    """``bias`` added after the cap, ``mask`` and-ed in (here it empties row 1's query 6 for
    every head: zeros, no sink gradient from it); d bias too."""
    cap, with_sinks = FEATURES[feature]
    q, k, v, w = _inputs(2)
    rng = np.random.default_rng(3)
    bias = rng.standard_normal((B, N, T, T)).astype(np.float32)
    mask = rng.random((B, 1, T, T)) > 0.2
    mask[1, :, 6] = False
    sinks = jnp.asarray(SINKS) if with_sinks else None

    def fn(q, k, v, sinks, bias):
        return thdkit.dot_product_attention(
            q, k, v, bias, jnp.asarray(mask), scale=SCALE, is_causal=True, segment_ids=IDS,
            segment_positions=POS, logits_soft_cap=cap, sinks=sinks,
        )  # fmt: skip

    out, grads = _grads(fn, q, k, v, w, sinks, jnp.asarray(bias))
    assert "d_bias" in grads
    want = oracle(
        q, k, v, w, _allowed()[:, None] & mask, scale=SCALE, cap=cap, sinks=sinks, bias=bias
    )
    _check(out, grads, want, what=f"dense, {feature}")
    np.testing.assert_array_equal(np.asarray(out)[1, 6], 0.0)


def test_a_minus_inf_bias_still_masks_under_the_cap():
    """The cap applies before the bias: ``-inf`` stays ``-inf`` (not ``-cap``)."""
    q, k, v, _ = _inputs(4)
    bias = np.zeros((1, 1, T, T), np.float32)
    bias[..., 0] = -np.inf
    got = jax.jit(
        lambda q, k, v, bias: thdkit.dot_product_attention(
            q, k, v, bias, scale=SCALE, logits_soft_cap=CAP, sinks=jnp.asarray(SINKS)
        )
    )(q, k, v, jnp.asarray(bias))
    keep = np.broadcast_to(np.arange(T)[None, None, :] > 0, (B, T, T))
    want = oracle(q, k, v, np.zeros_like(q), keep, scale=SCALE, cap=CAP, sinks=SINKS)[0]
    _close(got, want, "-inf bias")


def test_weights_are_of_the_capped_logits_and_leave_the_sinks_share():
    q, k, v, _ = _inputs(5)
    options = dict(
        is_causal=True, segment_ids=IDS, segment_positions=POS, scale=SCALE, logits_soft_cap=CAP
    )

    @jax.jit
    def run(q, k, v, sinks):
        weights = thdkit.dot_product_attention_weights(q, k, sinks=sinks, **options)
        return weights, thdkit.dot_product_attention(q, k, v, sinks=sinks, **options)

    weights, out = run(q, k, v, SINKS)
    _, want, _ = oracle(q, k, v, np.zeros_like(q), _allowed(), scale=SCALE, cap=CAP, sinks=SINKS)
    _close(weights, want, "weights")
    sums = np.asarray(weights).sum(-1)  # [B, N, T]
    live = IDS[:, None, :] != 0
    assert np.all(sums[np.broadcast_to(live, sums.shape)] < 1 - 1e-3)
    np.testing.assert_array_equal(sums[np.broadcast_to(~live, sums.shape)], 0.0)
    groups = N // K
    by_weights = np.einsum("bnts,bsnh->btnh", weights, np.repeat(v, groups, axis=2))
    _close(out, by_weights, "weights @ value")


def test_a_nan_in_one_document_reaches_no_other_row_nor_the_sinks():
    """Query token 1 of row 0 is NaN: every other output and every gradient but its own dq
    equal the oracle's without that row, on the dense path (the kernels' isolation, sinks
    included, is thdkit.attention's, tested with it)."""
    q, k, v, w = _inputs(6)
    q[0, 1] = np.nan
    live = np.ones((B, T, 1, 1), bool)
    live[0, 1] = False
    w_live = np.where(live, w, 0.0).astype(np.float32)
    out, weights, grads = oracle(
        np.where(live, q, 0.0), k, v, w_live, _allowed(), scale=SCALE, cap=CAP, sinks=SINKS
    )
    d_bias = grads[4].sum(axis=(0, 1), keepdims=True)  # of a bias [1, 1, T, T]
    want = np.where(live, out, 0.0), weights, (*grads[:4], d_bias)

    def fn(q, k, v, sinks, bias):
        out = thdkit.dot_product_attention(
            q, k, v, bias, scale=SCALE, is_causal=True, segment_ids=IDS, segment_positions=POS,
            logits_soft_cap=CAP, sinks=sinks,
        )  # fmt: skip
        return jnp.where(jnp.asarray(live), out, 0.0)

    out, grads = _grads(fn, q, k, v, w_live, jnp.asarray(SINKS), jnp.zeros((1, 1, T, T)))
    assert np.all(np.isfinite(np.asarray(grads["d_sinks"])))
    grads["dq"] = np.where(live, np.asarray(grads["dq"]), 0.0)
    _check(out, grads, want, what="NaN, dense")


# --- the plan, the implementations, errors ---------------------------------------------------


def test_a_plan_carries_the_cap_on_both_paths():
    q, k, v, w = _inputs(7)
    segments = thdkit.Segments.from_ids(IDS, POS)
    plan = thdkit.plan_attention(
        segments, mask_type="padding_causal", max_segments_per_seq=3, logits_soft_cap=CAP
    )
    want = oracle(q, k, v, w, _allowed(), scale=SCALE, cap=CAP, sinks=SINKS)[0]

    @jax.jit
    def run(q, k, v, sinks):
        options = dict(plan=plan, scale=SCALE, sinks=sinks)
        kernels = thdkit.dot_product_attention(q, k, v, **options)
        same = thdkit.dot_product_attention(q, k, v, logits_soft_cap=CAP, **options)
        dense = thdkit.dot_product_attention(q, k, v, jnp.zeros((1, 1, T, T)), **options)
        return kernels, same, dense

    names = ("kernels", "the plan's cap again", "dense")
    for what, got in zip(names, run(q, k, v, SINKS), strict=True):
        _close(got, want, what)
    with pytest.raises(ValueError, match=r"logits_soft_cap=3.0 differs from the plan's \(2.0\)"):
        thdkit.dot_product_attention(q, k, v, plan=plan, logits_soft_cap=3.0)
    with pytest.raises(ValueError, match=r"logits_soft_cap=3.0 differs from the plan's \(2.0\)"):
        thdkit.dot_product_attention_weights(q, k, plan=plan, logits_soft_cap=3.0)


def test_cudnn_refuses_both_saying_why():
    q, k, v, _ = _inputs(8)
    for options, named in (
        (dict(logits_soft_cap=CAP), "logits_soft_cap"),
        (dict(sinks=SINKS), "sinks"),
        (dict(logits_soft_cap=CAP, sinks=SINKS), "logits_soft_cap and sinks"),
    ):
        with pytest.raises(NotImplementedError, match=f"cannot take {named}: jax.nn's cuDNN"):
            thdkit.dot_product_attention(q, k, v, implementation="cudnn", **options)


class _NoCap(type(thdkit.kernels.get("reference"))):
    """The reference, declaring no optional feature: it takes sinks (it returns a log-sum-exp)
    but is refused the cap."""

    name = "no_cap_in_a_test"
    features = frozenset()


@pytest.fixture
def no_cap():
    thdkit.kernels.register(_NoCap())
    try:
        yield _NoCap.name
    finally:
        thdkit.kernels.unregister(_NoCap.name)


def test_an_implementation_without_the_cap_is_refused_naming_it(no_cap):
    q, k, v, w = _inputs(9)
    with pytest.raises(NotImplementedError, match="soft-capped logits"):
        thdkit.dot_product_attention(q, k, v, implementation=no_cap, logits_soft_cap=CAP)
    with pytest.raises(
        NotImplementedError, match=f"implementation='{no_cap}' cannot take .*soft-capped logits"
    ):
        _layer(logits_soft_cap=CAP, implementation=no_cap)
    got = thdkit.dot_product_attention(
        q, k, v, scale=SCALE, implementation=no_cap, sinks=jnp.asarray(SINKS)
    )
    keep = np.ones((B, T, T), bool)
    _close(got, oracle(q, k, v, w, keep, scale=SCALE, sinks=SINKS)[0], "sinks, no cap")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(sinks=np.zeros(3, np.float32)), ValueError, r"sinks must have shape \[H_q\]"),
        (dict(sinks=np.zeros((1, N), np.float32)), ValueError, "sinks must have shape"),
        (dict(sinks=np.zeros(N, np.int32)), TypeError, "sinks must be a float array"),
        (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap must be a positive"),
        (dict(logits_soft_cap=np.inf), ValueError, "logits_soft_cap must be a positive"),
        (dict(logits_soft_cap=jnp.float32(2)), TypeError, "logits_soft_cap must be a Python"),
    ],
)
def test_errors_name_the_parameter(options, error, match):
    q, k, v, _ = _inputs(10)
    empty = q[:, :0]
    for what, call in (
        ("kernels", lambda: thdkit.dot_product_attention(q, k, v, **options)),
        ("dense", lambda: thdkit.dot_product_attention(q, k, v, jnp.zeros((T, T)), **options)),
        ("weights", lambda: thdkit.dot_product_attention_weights(q, k, **options)),
        ("T = 0", lambda: thdkit.dot_product_attention(empty, k, v, **options)),
    ):
        with pytest.raises(error, match=match):
            call()
            pytest.fail(what)


# --- Flax -------------------------------------------------------------------------------------

F = 16  # PackedSelfAttention(N, F): head dim F / N = 4


def _layer(**options) -> PackedSelfAttention:
    return PackedSelfAttention(
        N, F, num_kv_heads=K, rope_theta=None, use_bias=False, rngs=nnx.Rngs(0), **options
    )


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, T, F)).astype(np.float32)


def _projected(layer: PackedSelfAttention, x) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(proj(jnp.asarray(x))) for proj in (layer.query, layer.key, layer.value))


def test_the_layer_learns_sinks_under_a_cap_forward_and_gradient():
    layer = _layer(logits_soft_cap=CAP, sinks=True, sinks_init=nnx.initializers.normal(1.0))
    assert layer.sinks[...].shape == (N,) and layer.sinks[...].dtype == jnp.float32
    assert "sinks" in nnx.state(layer, nnx.Param)
    x = _x(11)
    w = np.random.default_rng(12).standard_normal((B, T, F)).astype(np.float32)
    segments = thdkit.Segments.from_ids(IDS, POS)

    def loss(layer, x):
        out = layer(x, segments)
        return jnp.sum(out * w), out

    grads, out = nnx.jit(nnx.grad(loss, has_aux=True))(layer, jnp.asarray(x))
    q, k, v = _projected(layer, x)
    kernel = np.asarray(layer.out.kernel[...], np.float64)  # [N, D, F]
    w_attn = np.einsum("btf,ndf->btnd", w, kernel)
    sinks = np.asarray(layer.sinks[...])
    att, _, (_, _, _, d_sinks, _) = oracle(
        q, k, v, w_attn, _allowed(), scale=1 / np.sqrt(F // N), cap=CAP, sinks=sinks
    )
    _close(out, np.einsum("btnd,ndf->btf", att, kernel), "layer out")
    _close(grads.sinks[...], d_sinks, "layer d sinks")
    assert np.all(np.abs(np.asarray(grads.sinks[...])) > 1e-6)  # every head's sink learns


def test_the_sinks_are_drawn_after_the_projections():
    """The projections equal a layer's without sinks (and so Flax's); the default initialiser
    is gpt-oss's normal with stddev 0.02."""
    plain, with_sinks = _layer(), _layer(sinks=True)
    for name in ("query", "key", "value", "out"):
        np.testing.assert_array_equal(
            getattr(plain, name).kernel[...], getattr(with_sinks, name).kernel[...]
        )
    sinks = np.asarray(with_sinks.sinks[...])
    assert sinks.shape == (N,) and 0 < np.abs(sinks).max() < 0.1
    assert plain.sinks is None and "sinks" not in nnx.state(plain, nnx.Param)


@pytest.mark.slow
def test_the_layer_on_a_mesh_equals_the_layer_off_it():
    """cp = 2 over striped rows, with the cap and the sinks: outputs and d sinks as one device."""
    cp = 2
    layer = _layer(logits_soft_cap=CAP, sinks=True, sinks_init=nnx.initializers.normal(1.0))
    x = jnp.asarray(_x(13))
    real = jnp.asarray(IDS > 0)[..., None]
    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))
    ids_r, pos_r = (reorder.striped(a, cp=cp) for a in (IDS, POS))
    rows = thdkit.Segments(jnp.asarray(ids_r), jnp.asarray(pos_r), jnp.zeros_like(ids_r))

    def loss_one(layer, x):
        out = layer(x, thdkit.Segments.from_ids(IDS, POS))
        return jnp.sum(jnp.where(real, jnp.tanh(out), 0.0)), out

    def loss_ring(layer, x, rows):
        out = layer(
            reorder.striped(x, cp=cp, axis=1), rows, max_segments_per_seq=3, mesh=mesh,
            axis_name="cp",
        )  # fmt: skip
        out = reorder.unstriped(out, cp=cp, axis=1)
        return jnp.sum(jnp.where(real, jnp.tanh(out), 0.0)), out

    g_one, out_one = nnx.grad(loss_one, has_aux=True)(layer, x)
    g_ring, out_ring = nnx.jit(nnx.grad(loss_ring, has_aux=True))(layer, x, rows)
    np.testing.assert_allclose(
        jnp.where(real, out_ring, 0.0), jnp.where(real, out_one, 0.0), atol=1e-5
    )
    np.testing.assert_allclose(g_ring.sinks[...], g_one.sinks[...], atol=1e-5)


def test_the_layer_refuses_what_its_implementation_cannot_take():
    with pytest.raises(
        NotImplementedError, match=r"implementation='cudnn' cannot take .*returns no log-sum-exp"
    ):
        _layer(sinks=True, implementation="cudnn")
    with pytest.raises(TypeError, match="sinks must be a bool"):
        _layer(sinks=1)
    with pytest.raises(ValueError, match="logits_soft_cap must be a positive"):
        _layer(logits_soft_cap=-1.0)
    layer = _layer(logits_soft_cap=CAP)
    plan = _layer().plan(thdkit.Segments.from_ids(IDS, POS))
    with pytest.raises(ValueError, match="logits_soft_cap=None differ from the layer's"):
        layer(jnp.asarray(_x(14)), plan)


def test_make_attention_fn_caps_on_the_kernels_and_the_dense_path():
    q, k, v, _ = _inputs(15)
    segments = thdkit.Segments.from_ids(IDS, POS)
    fn = make_attention_fn(logits_soft_cap=CAP, max_segments_per_seq=3)
    want = oracle(q, k, v, np.zeros_like(q), _allowed(), scale=1 / np.sqrt(H), cap=CAP)[0]

    @jax.jit
    def run(q, k, v):
        kernels = fn(q, k, v, mask=segments, is_causal=True)
        return kernels, fn(q, k, v, jnp.zeros((1, 1, T, T)), mask=segments, is_causal=True)

    kernels, dense = run(q, k, v)
    _close(kernels, want, "attention_fn")
    _close(dense, want, "attention_fn, bias")
    plan = thdkit.plan_attention(segments, mask_type="padding_causal", max_segments_per_seq=3)
    with pytest.raises(ValueError, match="the plan fixes logits_soft_cap"):
        make_attention_fn(plan, logits_soft_cap=CAP)
    with pytest.raises(ValueError, match="logits_soft_cap\\) apply to Segments only"):
        fn(q, k, v, mask=plan)
    with pytest.raises(TypeError, match="logits_soft_cap must be a Python"):
        make_attention_fn(logits_soft_cap="50")


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_the_weights_path_joins_the_sinks():
    """Sowing (and dropout) attend through the weights: with sinks they equal the kernels'."""

    class Holder(nnx.Module):
        pass

    q, k, v, _ = _inputs(16)
    plan = thdkit.plan_attention(
        thdkit.Segments.from_ids(IDS, POS), mask_type="padding_causal", max_segments_per_seq=3,
        logits_soft_cap=CAP,
    )  # fmt: skip
    common = dict(
        plan=plan, bias=None, mask=None, is_causal=True, broadcast_dropout=True,
        dropout_rng=None, dropout_rate=0.0, deterministic=True, sinks=jnp.asarray(SINKS),
    )  # fmt: skip
    holder = Holder()
    by_weights = attend(*map(jnp.asarray, (q, k, v)), module=holder, **common)
    kernels = attend(*map(jnp.asarray, (q, k, v)), module=None, **common)
    want = oracle(q, k, v, np.zeros_like(q), _allowed(), scale=1 / np.sqrt(H), cap=CAP,
                  sinks=SINKS)[0]  # fmt: skip
    _close(by_weights, want, "weights path")
    _close(kernels, want, "kernels")
    sown = np.asarray(holder.attention_weights[0]).sum(-1)
    assert np.all(sown[np.broadcast_to(IDS[:, None] != 0, sown.shape)] < 1 - 1e-3)
