"""thdkit.flax.PackedSelfAttention against a plain-JAX attention block, under NNX transforms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

import thdkit
from thdkit import reorder, synth
from thdkit.flax import PackedSelfAttention, rope
from thdkit.segments import Segments

B, T, F = 2, 64, 16
S = 4
# (num_heads, num_kv_heads, head_dim): multi-head, grouped-query, multi-query.
HEADS = [(2, 2, 8), (4, 2, 8), (4, 1, 4)]


def _layout(seed: int) -> tuple[np.ndarray, np.ndarray]:
    return synth.packed_segments(np.random.default_rng(seed), batch=B, seq_len=T, max_segments=S)


def _x(seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed + 100).standard_normal((B, T, F)), jnp.float32)


def _layer(heads: tuple[int, int, int], **options) -> PackedSelfAttention:
    h, k, d = heads
    return PackedSelfAttention(F, h, k, d, mask_type="padding_causal", rngs=nnx.Rngs(0), **options)


def reference_block(weights: dict, x, ids, pos, *, heads: tuple[int, int, int], theta: float):
    """Projections, RoPE as complex rotation, repeated kv heads, a dense causal document mask."""
    h, k, d = heads
    batch, seq, _ = x.shape
    q = (x @ weights["q"]).reshape(batch, seq, h, d)
    key = (x @ weights["k"]).reshape(batch, seq, k, d)
    value = (x @ weights["v"]).reshape(batch, seq, k, d)

    def rotate(a):
        half = d // 2
        freq = 1.0 / theta ** (np.arange(half) / half)
        turn = jnp.exp(1j * pos[:, :, None, None] * jnp.asarray(freq)[None, None, None, :])
        c = (a[..., :half] + 1j * a[..., half:]) * turn
        return jnp.concatenate([c.real, c.imag], axis=-1).astype(jnp.float32)

    q, key = rotate(q), rotate(key)
    key, value = jnp.repeat(key, h // k, axis=2), jnp.repeat(value, h // k, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, key) / np.sqrt(d)
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0)
    allowed = (same & (pos[:, :, None] >= pos[:, None, :]))[:, None]
    logits = jnp.where(allowed, logits, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    weight = jnp.where(allowed, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    total = jnp.sum(weight, axis=-1, keepdims=True)
    probs = weight / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, value).reshape(batch, seq, h * d)
    return out @ weights["o"]


def _weights(layer: PackedSelfAttention) -> dict:
    return {name: getattr(layer, f"{name}_proj").kernel[...] for name in ("q", "k", "v", "o")}


@pytest.mark.parametrize(
    ("heads", "seed"), list(zip(HEADS, range(3), strict=True)), ids=["mha", "gqa", "mqa"]
)
def test_layer_matches_the_reference_block_forward_and_gradients(heads, seed):
    ids, pos = _layout(seed)
    x = _x(seed)
    layer = _layer(heads, rope_theta=500.0)
    segments = Segments.from_ids(ids, pos)
    plan = layer.plan(segments, max_segments_per_seq=S)
    real = jnp.asarray(ids > 0)[..., None]

    def loss_layer(layer, x):
        return jnp.sum(jnp.where(real, jnp.sin(layer(x, plan)), 0.0))

    def loss_reference(weights, x):
        out = reference_block(weights, x, jnp.asarray(ids), jnp.asarray(pos), heads=heads,
                              theta=500.0)  # fmt: skip
        return jnp.sum(jnp.where(real, jnp.sin(out), 0.0))

    expected = reference_block(
        _weights(layer), x, jnp.asarray(ids), jnp.asarray(pos), heads=heads, theta=500.0
    )
    mask = np.asarray(real)
    got = nnx.jit(lambda layer, x: layer(x, plan))(layer, x)
    np.testing.assert_allclose(np.where(mask, got, 0), np.where(mask, expected, 0), atol=2e-5)
    # Segments planned inside the layer give the same result.
    inside = layer(x, segments, max_segments_per_seq=S)
    np.testing.assert_allclose(np.where(mask, inside, 0), np.where(mask, got, 0), atol=1e-6)

    grads, dx = nnx.jit(nnx.grad(loss_layer, argnums=(0, 1)))(layer, x)
    ref_grads, ref_dx = jax.grad(loss_reference, argnums=(0, 1))(_weights(layer), x)
    np.testing.assert_allclose(dx, ref_dx, atol=5e-5)
    for name in ("q", "k", "v", "o"):
        np.testing.assert_allclose(
            getattr(grads, f"{name}_proj").kernel[...], ref_grads[name], atol=5e-5
        )


def test_documents_are_isolated():
    """Changing one document's inputs changes no other token's output or input gradient."""
    ids, pos = _layout(3)
    layer = _layer(HEADS[1])
    plan = layer.plan(Segments.from_ids(ids, pos), max_segments_per_seq=S)
    x = _x(3)
    other = (ids != 2)[..., None]
    changed = jnp.where(other, x, 100.0 * jnp.cos(x))
    run = nnx.jit(lambda layer, x: layer(x, plan))
    np.testing.assert_array_equal(
        np.where(other, run(layer, x), 0), np.where(other, run(layer, changed), 0)
    )

    def loss_of_others(x):
        return jnp.sum(jnp.where(other, layer(x, plan), 0.0) ** 2)

    d_x = jax.grad(loss_of_others)(x)
    assert np.all(np.asarray(d_x)[ids == 2] == 0)
    assert np.any(np.asarray(d_x)[(ids != 2) & (ids > 0)] != 0)


def test_rope_sees_positions_inside_documents():
    """A document alone at the start of a row and packed after another gives the same output."""
    layer = _layer(HEADS[0])
    x = _x(4)[:1]
    doc = x[:, :20]
    alone_ids = np.array([[1] * 20 + [0] * (T - 20)])
    packed_ids = np.array([[1] * 30 + [2] * 20 + [0] * (T - 50)])
    packed_x = jnp.concatenate([x[:, 20:50], doc, x[:, 50:]], axis=1)
    alone = layer(x, Segments.from_ids(alone_ids), max_segments_per_seq=S)
    packed = layer(packed_x, Segments.from_ids(packed_ids), max_segments_per_seq=S)
    np.testing.assert_allclose(packed[:, 30:50], alone[:, :20], atol=1e-5)
    # With positions counted along the row instead, it would differ.
    shifted = rope(jnp.ones((1, 2, 1, 4)), jnp.array([[0, 30]]))
    assert not np.allclose(shifted[0, 0], shifted[0, 1])


@pytest.mark.slow
def test_ring_on_four_devices_equals_one_device():
    """cp=4 over striped rows: outputs and gradients equal the single-device layer's."""
    cp = 4
    ids, pos = _layout(5)
    x = _x(5)
    layer = _layer(HEADS[1])
    plan = layer.plan(Segments.from_ids(ids, pos), max_segments_per_seq=S)
    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))
    ids_r, pos_r = (reorder.striped(a, cp=cp) for a in (ids, pos))
    x_r = reorder.striped(x, cp=cp, axis=1)
    ring_segments = Segments(jnp.asarray(ids_r), jnp.asarray(pos_r), jnp.zeros_like(ids_r))
    real = jnp.asarray(ids > 0)[..., None]

    def loss_one(layer, x):
        return jnp.sum(jnp.where(real, jnp.tanh(layer(x, plan)), 0.0))

    def loss_ring(layer, x, ring_segments):
        # The layout is an argument: traced, as in a train step (a concrete one closed over by
        # jit would be validated shard by shard on the host).
        out = layer(
            reorder.striped(x, cp=cp, axis=1), ring_segments, max_segments_per_seq=S,
            mesh=mesh, axis_name="cp",
        )  # fmt: skip
        return jnp.sum(jnp.where(real, jnp.tanh(reorder.unstriped(out, cp=cp, axis=1)), 0.0))

    out_ring = layer(x_r, ring_segments, max_segments_per_seq=S, mesh=mesh, axis_name="cp")
    mask = np.asarray(real)
    np.testing.assert_allclose(
        np.where(mask, reorder.unstriped(out_ring, cp=cp, axis=1), 0),
        np.where(mask, layer(x, plan), 0),
        atol=1e-5,
    )
    (g_one, dx_one) = nnx.grad(loss_one, argnums=(0, 1))(layer, x)
    (g_ring, dx_ring) = nnx.jit(nnx.grad(loss_ring, argnums=(0, 1)))(layer, x, ring_segments)
    np.testing.assert_allclose(dx_ring, dx_one, atol=1e-5)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        np.testing.assert_allclose(
            getattr(g_ring, name).kernel[...], getattr(g_one, name).kernel[...], atol=1e-4
        )


class _Stack(nnx.Module):
    """Layers stacked with nnx.vmap and run with nnx.scan, as a model does."""

    def __init__(self, layers: int, *, plan_once: bool) -> None:
        self.plan_once = plan_once

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> PackedSelfAttention:
            return PackedSelfAttention(F, 2, 1, 8, mask_type="padding_causal", rngs=rngs)

        self.layers = make(nnx.Rngs(0))

    def __call__(self, x, ids, pos):
        segments = Segments.from_ids(ids, pos)
        if self.plan_once:
            plan = thdkit.plan_attention(
                segments, mask_type="padding_causal", max_segments_per_seq=S
            )

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            if self.plan_once:
                return x + layer(x, plan)
            return x + layer(x, segments, max_segments_per_seq=S)

        return body(x, self.layers)


LAYOUT_OPS = ("cummax", "cummin", "argmax")


def _count(jaxpr, *, inside_loop: bool = False) -> tuple[int, int]:
    """(layout ops anywhere, layout ops inside scan bodies) in a jaxpr and its sub-jaxprs."""
    total = looped = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in LAYOUT_OPS:
            total += 1
            looped += inside_loop
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            t, loop = _count(sub, inside_loop=inside_loop or eqn.primitive.name == "scan")
            total, looped = total + t, looped + loop
    return total, looped


def test_train_step_plans_once_not_per_layer():
    """The jitted train step (forward, backward, update) holds the layout work of one
    plan_attention: the same count of layout ops as planning alone, none inside the layer loop."""
    ids, pos = (jnp.asarray(a) for a in _layout(6))
    x = _x(6)

    def program(plan_once: bool, *, train: bool):
        model = _Stack(3, plan_once=plan_once)
        graphdef, state = nnx.split(model)

        def forward(state, x, ids, pos):
            return nnx.merge(graphdef, state)(x, ids, pos)

        def train_step(state, x, ids, pos):
            grads = jax.grad(lambda state: jnp.sum(forward(state, x, ids, pos) ** 2))(state)
            return jax.tree.map(lambda p, g: p - 0.1 * g, state, grads)

        step = train_step if train else forward
        return jax.make_jaxpr(jax.jit(step))(state, x, ids, pos).jaxpr

    def plan_alone(ids, pos):
        segments = Segments.from_ids(ids, pos)
        return thdkit.plan_attention(segments, mask_type="padding_causal", max_segments_per_seq=S)

    one_plan, _ = _count(jax.make_jaxpr(plan_alone)(ids, pos).jaxpr)
    assert one_plan > 0
    assert _count(program(plan_once=True, train=True)) == (one_plan, 0)
    assert _count(program(plan_once=True, train=False)) == (one_plan, 0)
    # The count sees planning per layer: its layout work sits inside the layer loop.
    _, looped = _count(program(plan_once=False, train=False))
    assert looped > 0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: _layer((3, 2, 8)), ValueError, "multiple of num_kv_heads"),
        (lambda: _layer((2, 2, 7)), ValueError, "head_dim must be even"),
        (lambda: _layer((2, 2, 8), rope_theta=0.0), ValueError, "rope_theta"),
        (lambda: _layer((2, 2.0, 8)), TypeError, "num_kv_heads must be an int"),
        (lambda: _layer((0, 1, 8)), ValueError, "num_heads must be >= 1"),
        (lambda: _layer((2, 2, 8), implementation="flash"), ValueError, "implementation"),
    ],
)
def test_construction_errors_name_the_parameter(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_call_errors():
    ids, pos = _layout(7)
    layer = _layer(HEADS[0])
    segments = Segments.from_ids(ids, pos)
    plan = layer.plan(segments, max_segments_per_seq=S)
    x = _x(7)
    with pytest.raises(ValueError, match="max_segments_per_seq is required"):
        layer(x, segments)
    with pytest.raises(ValueError, match="comes from the plan"):
        layer(x, plan, max_segments_per_seq=S)
    with pytest.raises(ValueError, match="in_features=16"):
        layer(x[..., :8], plan)
    with pytest.raises(ValueError, match="must be"):
        layer(x[:, :32], plan)
    with pytest.raises(TypeError, match="Segments or an AttentionPlan"):
        layer(x, (ids, pos))
    with pytest.raises(ValueError, match="mesh and axis_name together"):
        layer(x, segments, max_segments_per_seq=S, axis_name="cp")
    mesh = Mesh(np.array(jax.devices()[:1]), ("cp",))
    with pytest.raises(TypeError, match="pass the Segments"):
        layer(x, plan, mesh=mesh, axis_name="cp")
    other = thdkit.plan_attention(segments, mask_type="padding", max_segments_per_seq=S)
    with pytest.raises(ValueError, match="differ from the layer"):
        layer(x, other)
