"""thdkit.flax against Flax's own attention where a hardening review found them apart: integer
masks, cross-attention and decoding without a layout, several batch dims, ids numbered from 0,
one-device meshes, the ring's kernel, and error messages that name the caller's arguments."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from jax.sharding import Mesh

import thdkit
from thdkit import reorder
from thdkit._src.kernels import base
from thdkit._src.kernels.dense import Dense
from thdkit.flax import PackedSelfAttention, make_attention_fn

Segments = thdkit.Segments

B, T, F, N, H = 2, 16, 8, 2, 4
IDS = np.array([[1] * 5 + [2] * 7 + [0] * 4, [1] * 9 + [2] * 3 + [3] * 3 + [0]])
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _qkv(seed: int, batch: tuple[int, ...] = (B,), seq_kv: int = T):
    q = _normal(seed, (*batch, T, N, H))
    k, v = (_normal(seed + i, (*batch, seq_kv, N, H)) for i in (1, 2))
    return q, k, v


def _packed_mask(ids: np.ndarray) -> np.ndarray:
    """The padding mask of a packed layout, bool[*B, 1, T, T]."""
    same = (ids[..., :, None] == ids[..., None, :]) & (ids[..., :, None] != 0)
    return same[..., None, :, :]


def _live(allowed: np.ndarray) -> np.ndarray:
    """Query rows with an allowed key, as [..., T, 1, 1] (Flax averages the others)."""
    return np.any(allowed, axis=-1).swapaxes(-1, -2)[..., None] if allowed.ndim else allowed


def _close(got, want, rows, atol=2e-5):
    np.testing.assert_allclose(np.where(rows, got, 0), np.where(rows, want, 0), atol=atol)


def _mha(**options) -> nnx.MultiHeadAttention:
    return nnx.MultiHeadAttention(
        num_heads=N, in_features=F, qkv_features=N * H, rngs=nnx.Rngs(3), **options
    )


# --- 1. integer masks -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8])
@pytest.mark.parametrize("shape", ["ids", "dense"])
def test_an_integer_mask_is_refused_as_dot_product_attention_refuses_it(dtype, shape):
    """Segment ids given as mask= would attend across documents (non-zero = attend): refused
    with a TypeError naming mask and saying how a layout goes in."""
    ids = jnp.asarray(IDS, dtype)
    mask = ids[:, None, None, :] if shape == "ids" else jnp.asarray(_packed_mask(IDS), dtype)
    q, k, v = _qkv(0)
    with pytest.raises(TypeError, match="mask must be a boolean"):
        thdkit.dot_product_attention(q, k, v, mask=mask)
    plan = thdkit.plan_attention(
        Segments.from_ids(IDS), mask_type="padding", max_segments_per_seq=3
    )
    for fn in (make_attention_fn(), make_attention_fn(plan)):
        with pytest.raises(TypeError, match=r"^mask must be a boolean array") as error:
            fn(q, k, v, mask=mask)
        message = str(error.value)
        assert "Segments.from_ids" in message and "padding_id=-1" in message
        assert "plan" in message
    module = _mha(decode=False, attention_fn=make_attention_fn())
    with pytest.raises(TypeError, match="mask must be a boolean"):
        module(_normal(1, (B, T, F)), mask=mask)


def test_ids_and_positions_as_a_tuple_mask_are_refused():
    q, k, v = _qkv(1)
    with pytest.raises(TypeError, match=r"Segments\.from_ids"):
        make_attention_fn()(q, k, v, mask=(jnp.asarray(IDS), jnp.zeros_like(jnp.asarray(IDS))))


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.float32])
def test_boolean_and_flax_float_masks_still_equal_flax(dtype):
    """Flax's own mask helpers return float 0/1 masks: they keep working, as in Flax."""
    x = _normal(2, (B, T, F))
    mask = nnx.make_attention_mask(jnp.asarray(IDS), jnp.asarray(IDS), jnp.equal, dtype=dtype)
    mask = mask & (jnp.asarray(IDS) > 0)[:, None, :, None] if dtype == jnp.bool_ else mask
    ours = _mha(decode=False, attention_fn=make_attention_fn())(x, mask=mask)
    theirs = _mha(decode=False)(x, mask=mask)
    _close(ours, theirs, (IDS > 0)[..., None])


# --- 2. no layout, T_kv != T ----------------------------------------------------------------------


@pytest.mark.parametrize("seq_kv", [8, 24])
@pytest.mark.parametrize("mask_shape", [None, (B, 1, T, "S"), (B, 1, 1, "S"), (1, "S")])
@pytest.mark.parametrize("is_causal", [False, True])
def test_without_a_layout_cross_attention_equals_flax(seq_kv, mask_shape, is_causal):
    """One document a row on each side, T_kv != T: Flax's own attention, with its mask."""
    q, k, v = _qkv(3, seq_kv=seq_kv)
    mask = None
    if mask_shape is not None:
        shape = tuple(seq_kv if d == "S" else d for d in mask_shape)
        mask = jax.random.bernoulli(jax.random.key(seq_kv), 0.6, shape).at[..., 0].set(True)
    got = jax.jit(functools.partial(make_attention_fn(), is_causal=is_causal))(q, k, v, mask=mask)
    want = nnx.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    assert got.shape == want.shape == (B, T, N, H)
    _close(got, want, np.ones((B, T, 1, 1), bool))


def test_stock_cross_attention_module_and_decoding_equal_flax():
    """nnx.MultiHeadAttention with inputs_k of another length, and its decode steps (queries
    of length 1 over the cache): make_attention_fn() equals Flax's own attention."""
    x, context = _normal(4, (B, T, F)), _normal(5, (B, 24, F))
    ours = _mha(decode=False, attention_fn=make_attention_fn())
    theirs = _mha(decode=False)
    _close(ours(x, context), theirs(x, context), np.ones((B, T, 1), bool))
    steps = []
    for fn in (make_attention_fn(), nnx.dot_product_attention):
        module = _mha(decode=True, attention_fn=fn)
        module.init_cache((B, T, F))
        steps.append(jnp.concatenate([module(x[:, t : t + 1]) for t in range(4)], axis=1))
    _close(steps[0], steps[1], np.ones((B, 4, 1), bool))


# --- 3. several batch dims ------------------------------------------------------------------------


MASKS_2D_BATCH = [(2, 1, 1, T, T), (1, 3, 1, T, T), (3, 1, T, T), (2, 3, N, T, T), (T, T)]


@pytest.mark.parametrize("mask_shape", MASKS_2D_BATCH, ids=str)
def test_two_batch_dims_with_broadcast_masks_equal_flax(mask_shape):
    """query [2, 3, T, N, H] and a mask broadcastable to [2, 3, N, T, T]: linen's attention
    (which broadcasts such masks) gives the same output, and bias broadcasts alike."""
    q, k, v = _qkv(6, batch=(2, 3))
    mask = jax.random.bernoulli(jax.random.key(7), 0.6, mask_shape).at[..., 0].set(True)
    bias = _normal(8, mask_shape)
    fn = make_attention_fn()

    def full_rank(x):  # the oracle runs under strict rank promotion too
        return x.reshape((1,) * (5 - x.ndim) + x.shape)

    want = linen.dot_product_attention(q, k, v, mask=full_rank(mask))
    _close(fn(q, k, v, mask=mask), want, True)
    want = linen.dot_product_attention(q, k, v, bias=full_rank(bias))
    _close(fn(q, k, v, bias=bias), want, True)


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_two_batch_dims_in_a_module_with_sown_weights_and_packed_segments():
    """The module on inputs [2, 3, T, F] with Segments of [2, 3, T] fields (or a plan of the
    flattened rows) as its mask equals Flax's module with the dense packed mask; the sown
    weights keep the caller's batch dims."""
    ids = np.stack([IDS, IDS[::-1], IDS], axis=1)  # [2, 3, T]
    x = _normal(9, (2, 3, T, F))
    segments = Segments.from_ids(ids)
    flat = Segments.from_ids(ids.reshape(6, T))
    plan = thdkit.plan_attention(flat, mask_type="padding", max_segments_per_seq=3)
    rows = (ids > 0)[..., None]
    module = _mha(decode=False, attention_fn=make_attention_fn())
    want = _mha(decode=False)(x, mask=jnp.asarray(_packed_mask(ids)))
    _close(module(x, mask=segments), want, rows)
    _close(module(x, mask=plan, sow_weights=True), want, rows)
    assert module.attention_weights[0].shape == (2, 3, N, T, T)


@pytest.mark.parametrize("mask_shape", [(4, 1, 1, T, T), (2, 3, 3, T, T), (1, 1, 1, 1, T, T)])
def test_a_mask_that_does_not_broadcast_names_the_callers_shapes(mask_shape):
    q, k, v = _qkv(10, batch=(2, 3))
    mask = jnp.ones(mask_shape, bool)
    with pytest.raises(ValueError, match=r"^mask of shape") as error:
        make_attention_fn()(q, k, v, mask=mask)
    message = str(error.value)
    assert str(mask_shape) in message and str(q.shape) in message
    assert "(6," not in message  # no flattened shape the caller never passed


def test_a_layout_of_other_shapes_names_mask_and_the_query_shape():
    q, k, v = _qkv(11, batch=(2, 3))
    small = Segments.from_ids(IDS)  # [2, T]: not [2, 3, T] nor [6, T]
    plan = thdkit.plan_attention(small, mask_type="padding", max_segments_per_seq=3)
    fn = make_attention_fn()
    with pytest.raises(ValueError, match=r"^mask has fields of shape \(2, 16\)") as error:
        fn(q, k, v, mask=small)
    assert str(q.shape) in str(error.value)
    with pytest.raises(ValueError, match=r"^mask is a plan of \[B, T\] = \(2, 16\)") as error:
        fn(q, k, v, mask=plan)
    assert str(q.shape) in str(error.value)
    with pytest.raises(ValueError, match=r"^layout has fields"):
        make_attention_fn(small)(q, k, v)
    with pytest.raises(ValueError, match="pass a pair"):
        make_attention_fn()(*_qkv(12, seq_kv=8)[:1], *_qkv(12, seq_kv=8)[1:], mask=small)


# --- 4. ids numbered from 0 -----------------------------------------------------------------------


def test_ids_numbered_from_zero_go_in_with_padding_id_minus_one():
    """Ids 0..n-1 (no padding) through Segments.from_ids(..., padding_id=-1): every token is a
    document token, in the stock module and in the layer."""
    zero_based = np.array([[0] * 6 + [1] * 10, [0] * 3 + [1] * 5 + [2] * 8])
    x = _normal(13, (B, T, F))
    segments = Segments.from_ids(zero_based, padding_id=-1)
    module = _mha(decode=False, attention_fn=make_attention_fn())
    want = _mha(decode=False)(x, mask=jnp.asarray(_packed_mask(zero_based + 1)))
    _close(module(x, mask=segments), want, np.ones((B, T, 1), bool))
    layer = PackedSelfAttention(N, F, rngs=nnx.Rngs(0), implementation="reference")
    np.testing.assert_array_equal(layer(x, segments), layer(x, Segments.from_ids(zero_based + 1)))


def test_the_docs_say_how_ids_numbered_from_zero_go_in():
    texts = {
        "make_attention_fn": make_attention_fn.__doc__,
        "PackedSelfAttention": PackedSelfAttention.__doc__,
        "thdkit.flax": thdkit.flax.__doc__,
        "docs/training.md": (DOCS / "training.md").read_text("utf-8"),
    }
    for where, text in texts.items():
        assert "padding_id=-1" in text, where
    with pytest.raises(TypeError, match="padding_id=-1"):
        PackedSelfAttention(N, F, rngs=nnx.Rngs(0))(_normal(0, (B, T, F)), jnp.asarray(IDS))


# --- 5. one-device meshes -------------------------------------------------------------------------


def _layer(**options) -> PackedSelfAttention:
    return PackedSelfAttention(N, F, num_kv_heads=1, use_bias=False, rngs=nnx.Rngs(0), **options)


@pytest.mark.parametrize("reordering", [reorder.striped, reorder.dual_chunk_swap])
def test_rows_reordered_for_two_devices_on_a_one_device_mesh_say_why(reordering):
    """A one-device axis reads every row whole; rows reordered for cp = 2 raise, saying so and
    how to simulate devices (not only 'must be passed in document order')."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("cp",))
    segments = jax.tree.map(lambda a: reordering(np.asarray(a), cp=2), Segments.from_ids(IDS))
    with pytest.raises(ValueError, match=r"^segments_or_plan row \(\d+, 0\), token") as error:
        _layer()(_normal(14, (B, T, F)), segments, mesh=mesh, axis_name="cp")
    message = str(error.value)
    assert "mesh axis 'cp' has 1 device" in message
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=N" in message
    assert "q_segments" not in message


def test_rows_in_document_order_on_a_one_device_mesh_equal_the_layer_without_mesh():
    mesh = Mesh(np.array(jax.devices()[:1]), ("cp",))
    x, segments = _normal(15, (B, T, F)), Segments.from_ids(IDS)
    layer = _layer()
    _close(layer(x, segments, mesh=mesh, axis_name="cp"), layer(x, segments), (IDS > 0)[..., None])


def test_the_docs_context_parallel_block_says_how_to_run_it():
    text = (DOCS / "training.md").read_text("utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "Mesh(" in b]
    assert "--xla_force_host_platform_device_count=2" in block
    assert block.index("jax.device_count()") < block.index("Mesh(")  # checked first


# --- 6. the ring runs the layer's implementation --------------------------------------------------


class _CountingReference(Dense):
    """The reference kernel, counting the traces of its forward."""

    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        return super().forward(*args, **kwargs)


@pytest.fixture
def counting_reference():
    original = base.get("reference")
    _CountingReference.calls = 0
    base.register(_CountingReference(), replace=True)
    try:
        yield _CountingReference
    finally:
        base.register(original, replace=True)


@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
def test_the_layer_on_a_mesh_runs_its_implementation(counting_reference, implementation):
    cp = 2
    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))
    x, segments = _normal(16, (B, T, F)), Segments.from_ids(IDS)
    layer = _layer(implementation=implementation)
    striped = jax.tree.map(lambda a: reorder.striped(np.asarray(a), cp=cp), segments)
    out = layer(reorder.striped(x, cp=cp, axis=1), striped, mesh=mesh, axis_name="cp")
    used = counting_reference.calls
    assert (used > 0) == (implementation == "reference")
    _close(reorder.unstriped(out, cp=cp, axis=1), layer(x, segments), (IDS > 0)[..., None])


def test_a_kernel_without_log_sum_exp_on_a_mesh_is_refused():
    mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
    layer = _layer(implementation="cudnn")
    with pytest.raises(ValueError, match=r"implementation='cudnn' cannot run context-parallel"):
        layer(_normal(17, (B, T, F)), Segments.from_ids(IDS), mesh=mesh, axis_name="cp")


# --- 7. messages name the caller's arguments ------------------------------------------------------


BROKEN = np.array([[1, 1, 2, 2, 1, 1] + [0] * 10] * 2)  # id 1 in two runs
BROKEN_POS = np.array([[0, 1, 0, 1, 0, 1] + [0] * 10] * 2)


def test_layout_errors_name_the_layers_arguments_and_no_mesh_advice_off_a_mesh():
    layer = _layer()
    x = _normal(18, (B, T, F))
    broken = Segments(*(jnp.asarray(a) for a in (BROKEN, BROKEN_POS, BROKEN)))
    for call, name in (
        (lambda: layer(x, broken), "segments_or_plan"),
        (lambda: layer.plan(broken), "segments"),
    ):
        with pytest.raises(ValueError, match=rf"^{name} row 0, token 4: id 1 ") as error:
            call()
        assert "q_segments" not in str(error.value) and "mesh=" not in str(error.value)
    plan = layer.plan(Segments.from_ids(IDS))
    with pytest.raises(ValueError, match=r"^segments_or_plan has \[B, T\] = \(2, 16\)"):
        layer(x[:1], plan)


def test_layout_errors_on_a_mesh_name_segments_or_plan_shard_by_shard():
    mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
    ids = np.array([[1] * 8 + [2, 2, 1, 1, 0, 0, 0, 0]] * 2)  # shard 1: id 1 after id 2
    bad = Segments(*(jnp.asarray(a) for a in (ids, np.zeros_like(ids), ids)))
    with pytest.raises(ValueError, match=r"^segments_or_plan row \(0, 1\), token 2") as error:
        _layer(mask_type="padding")(_normal(19, (B, T, F)), bad, mesh=mesh, axis_name="cp")
    assert "q_segments" not in str(error.value) and "has 1 device" not in str(error.value)


def test_attention_fn_layout_errors_name_mask_or_layout():
    q, k, v = _qkv(20)
    broken = Segments(*(jnp.asarray(a) for a in (BROKEN, BROKEN_POS, BROKEN)))
    good = Segments.from_ids(IDS)
    cases = [
        (make_attention_fn(), broken, "mask"),
        (make_attention_fn(), (good, broken), r"mask\[1\]"),
        (make_attention_fn(broken), None, "layout"),
        (make_attention_fn((broken, good)), None, r"layout\[0\]"),
    ]
    for fn, mask, name in cases:
        with pytest.raises(ValueError, match=rf"^{name} row 0, token 4: id 1 ") as error:
            fn(q, k, v, mask=mask)
        message = str(error.value)
        assert "q_segments" not in message and "kv_segments" not in message
        assert "mesh=" not in message and "PackedSelfAttention" not in message
