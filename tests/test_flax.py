"""thdkit.flax: PackedSelfAttention against a plain-JAX attention block and Flax's own module,
under NNX transforms; make_attention_fn inside stock nnx and linen attention modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from jax.experimental import checkify
from jax.sharding import Mesh

import thdkit
from thdkit._src import reorder, synth
from thdkit.flax import PackedSelfAttention, make_attention_fn, rope

Segments = thdkit.Segments

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
    options = {"use_bias": False, **options}
    return PackedSelfAttention(
        h, F, qkv_features=h * d, num_kv_heads=k, mask_type="padding_causal", rngs=nnx.Rngs(0),
        **options,
    )  # fmt: skip


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


PARAMS = {"q": "query", "k": "key", "v": "value", "o": "out"}


def _flat(kernel: jax.Array, name: str) -> jax.Array:
    """A LinearGeneral kernel ([F, H, D] in, [H, D, F] out) as the [in, out] matrix."""
    return kernel.reshape(-1, kernel.shape[-1]) if name == "o" else kernel.reshape(F, -1)


def _weights(layer: PackedSelfAttention) -> dict:
    return {name: _flat(getattr(layer, PARAMS[name]).kernel[...], name) for name in PARAMS}


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
    for name, param in PARAMS.items():
        np.testing.assert_allclose(
            _flat(getattr(grads, param).kernel[...], name), ref_grads[name], atol=5e-5
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
    for name in PARAMS.values():
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
            return PackedSelfAttention(
                2, F, num_kv_heads=1, use_bias=False, mask_type="padding_causal", rngs=rngs
            )

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
        (lambda: _layer((2, 2, 7)), ValueError, "must be even"),
        (lambda: _layer((2, 2, 8), rope_theta=0.0), ValueError, "rope_theta"),
        (lambda: _layer((2, 2.0, 8)), TypeError, "num_kv_heads must be an int"),
        (lambda: _layer((0, 1, 8)), ValueError, "num_heads must be >= 1"),
        (lambda: _layer((2, 2, 8), implementation="flash"), ValueError, "implementation"),
        (lambda: _layer((2, 2, 8), dropout_rate=1.0), ValueError, "dropout_rate"),
        (lambda: _layer((2, 2, 8), window_size=(1.0, 2)), TypeError, "window_size left"),
        (lambda: _layer((2, 2, 8), check_layout=1), TypeError, "check_layout must be a bool"),
        (
            lambda: PackedSelfAttention(3, F, qkv_features=16, rngs=nnx.Rngs(0)),
            ValueError,
            "qkv_features=16 must be a multiple of num_heads=3",
        ),
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
    # S is optional with Segments (None: the largest id): the same output as the plan.
    np.testing.assert_allclose(layer(x, segments), layer(x, plan), atol=1e-6)
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
    with pytest.raises(TypeError, match="segments_or_plan is an AttentionPlan"):
        layer(x, plan, mesh=mesh, axis_name="cp")
    other = thdkit.plan_attention(segments, mask_type="padding", max_segments_per_seq=S)
    with pytest.raises(ValueError, match="differ from the layer"):
        layer(x, other)


def _above_s(ids: np.ndarray) -> np.ndarray:
    """The ids of a row shifted above S = ``S``: each document keeps its run."""
    return np.where(ids > 0, ids + S, 0)


def test_check_layout_catches_an_id_above_s_under_jit():
    """Under jit nothing validates values: with check_layout=True the layer's checkify check
    reports the id above S (its row, token and code); without it the step runs silently."""
    ids, pos = _layout(8)
    x = _x(8)

    @nnx.jit
    def forward(layer, x, segments):
        return checkify.checkify(lambda x: layer(x, segments, max_segments_per_seq=S))(x)

    @nnx.jit
    def forward_plan(layer, x, segments):
        def f(x):
            return layer(x, layer.plan(segments, max_segments_per_seq=S))

        return checkify.checkify(f)(x)

    checked, unchecked = _layer(HEADS[0], check_layout=True), _layer(HEADS[0])
    good, bad = Segments.from_ids(ids, pos), Segments.from_ids(_above_s(ids), pos)
    assert forward(checked, x, good)[0].get() is None
    row, token = np.argwhere(_above_s(ids) > S)[0]
    # Planned in the call (its argument segments_or_plan), or by layer.plan (segments).
    for run, name in ((forward, "segments_or_plan"), (forward_plan, "segments")):
        message = run(checked, x, bad)[0].get()
        assert message.startswith(f"{name}.ids: invalid layout in row {row}, token {token}: ")
        assert f"code {int(thdkit.LayoutError.ID_ABOVE_MAX)} " in message
    assert forward(unchecked, x, bad)[0].get() is None  # opt-in: no check, nothing reported
    with pytest.raises(ValueError, match="not functionalized"):  # JAX: checkify.checkify needed
        nnx.jit(lambda layer, x, s: layer(x, s, max_segments_per_seq=S))(checked, x, bad)
    # Eagerly, the plan validates concrete segments as always: a ValueError naming the token.
    with pytest.raises(ValueError, match=rf"row {row}, token {token}: id \d+ exceeds"):
        checked(x, bad, max_segments_per_seq=S)


@pytest.mark.slow
def test_check_layout_checks_each_shard_on_a_mesh():
    cp = 2
    ids, pos = _layout(9)
    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))
    layer = _layer(HEADS[0], check_layout=True)

    @nnx.jit
    def forward(layer, x, segments):
        def f(x):
            return layer(x, segments, max_segments_per_seq=S, mesh=mesh, axis_name="cp")

        return checkify.checkify(f)(x)

    def striped_segments(ids):
        whole = Segments.from_ids(ids, pos)
        return jax.tree.map(lambda a: reorder.striped(np.asarray(a), cp=cp), whole)

    x = reorder.striped(_x(9), cp=cp, axis=1)
    assert forward(layer, x, striped_segments(ids))[0].get() is None  # valid shard by shard
    message = forward(layer, x, striped_segments(_above_s(ids)))[0].get()
    assert "segments_or_plan.ids, shard by shard (row = batch row * 2 + shard)" in message
    assert f"code {int(thdkit.LayoutError.ID_ABOVE_MAX)} " in message


def test_a_row_reordered_for_context_parallelism_is_refused_naming_the_argument():
    """Planning a striped row as a whole row breaks rule 3 or 4; off a mesh the error names the
    caller's argument, the row and the token, and adds no advice about the layer's mesh."""
    ids, pos = _layout(10)
    layer = _layer(HEADS[0])
    striped = Segments(*(reorder.striped(np.asarray(a), cp=4) for a in (ids, pos, ids)))
    with pytest.raises(ValueError, match=r"^segments row \d+, token \d+: id \d+ ") as plan_error:
        layer.plan(striped, max_segments_per_seq=S)
    with pytest.raises(ValueError, match=r"^segments_or_plan row \d+, token \d+") as call_error:
        layer(_x(10), striped, max_segments_per_seq=S)
    for error in (plan_error, call_error):
        assert "q_segments" not in str(error.value)
        assert "mesh=" not in str(error.value)


def test_rope_rejects_float_positions():
    with pytest.raises(TypeError, match="positions must be an integer array"):
        rope(jnp.ones((1, 2, 1, 4)), jnp.array([[0.0, 1.0]]))


# --- make_attention_fn in Flax's own modules ----------------------------------------------------


def _dense_mask(ids: np.ndarray, pos: np.ndarray, *, causal: bool = True) -> jax.Array:
    """The packed mask as a dense Flax mask, bool[B, 1, T, T] (the reference's input)."""
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0)
    if causal:
        same &= pos[:, :, None] >= pos[:, None, :]
    return jnp.asarray(same)[:, None]


def _live(ids: np.ndarray) -> jax.Array:
    """Rows with an allowed key (non-padding): Flax's dense attention averages the others."""
    return jnp.asarray(ids > 0)[..., None]


def _nnx_mha(**options) -> nnx.MultiHeadAttention:
    return nnx.MultiHeadAttention(
        num_heads=4, in_features=F, num_kv_heads=2, decode=False, rngs=nnx.Rngs(1), **options
    )


def test_stock_nnx_module_equals_flax_with_a_dense_mask_outputs_and_gradients():
    """nnx.MultiHeadAttention(attention_fn=make_attention_fn()) given the plan as its mask ==
    the same module (same parameters) with Flax's attention and the dense packed mask."""
    ids, pos = _layout(8)
    x = _x(8)
    plan = thdkit.plan_attention(
        Segments.from_ids(ids, pos), mask_type="padding_causal", max_segments_per_seq=S
    )
    ours = _nnx_mha(attention_fn=make_attention_fn())
    theirs = _nnx_mha()
    dense, live = _dense_mask(ids, pos), _live(ids)

    def loss(module, x, mask):
        out = module(x, mask=mask)
        return jnp.sum(jnp.where(live, jnp.sin(out), 0.0)), out

    step = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))
    (g_ours, dx_ours), out_ours = step(ours, x, plan)
    (g_theirs, dx_theirs), out_theirs = step(theirs, x, dense)
    np.testing.assert_allclose(
        jnp.where(live, out_ours, 0), jnp.where(live, out_theirs, 0), atol=1e-5
    )
    np.testing.assert_allclose(dx_ours, dx_theirs, atol=1e-5)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(g_ours, nnx.Param)),
        nnx.to_flat_state(nnx.state(g_theirs, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_allclose(a[...], b[...], atol=1e-5, err_msg=str(path))


def test_stock_linen_module_with_a_closed_over_plan_or_segments_as_its_mask():
    """linen.MultiHeadDotProductAttention built per call around the batch's plan (the linen way),
    or given Segments through mask, equals Flax's attention with the dense mask."""
    ids, pos = _layout(9)
    x = _x(9)
    segments = Segments.from_ids(ids, pos)
    plan = thdkit.plan_attention(
        segments, mask_type="padding_causal", max_segments_per_seq=S, implementation="reference"
    )

    class Model(linen.Module):
        @linen.compact
        def __call__(self, x, plan=None, mask=None):
            fn = make_attention_fn(plan) if plan is not None else linen.dot_product_attention
            return linen.MultiHeadDotProductAttention(num_heads=2, attention_fn=fn)(x, mask=mask)

    model = Model()
    params = model.init(jax.random.key(0), x, mask=_dense_mask(ids, pos))
    live = _live(ids)
    want = model.apply(params, x, mask=_dense_mask(ids, pos))
    got = jax.jit(model.apply)(params, x, plan)
    np.testing.assert_allclose(jnp.where(live, got, 0), jnp.where(live, want, 0), atol=1e-5)
    fn_model = linen.MultiHeadDotProductAttention(
        num_heads=2, attention_fn=make_attention_fn(mask_type="padding_causal",
                                                    implementation="reference"),
    )  # fmt: skip
    inner = {"params": params["params"]["MultiHeadDotProductAttention_0"]}
    got_segments = fn_model.apply(inner, x, mask=segments)
    np.testing.assert_allclose(
        jnp.where(live, got_segments, 0), jnp.where(live, want, 0), atol=1e-5
    )


def test_stock_module_isolates_documents_in_outputs_and_gradients():
    """Perturbing one document's inputs leaves every other token's output bit-equal and its
    gradient with respect to that document zero."""
    ids, pos = _layout(10)
    x = _x(10)
    plan = thdkit.plan_attention(
        Segments.from_ids(ids, pos), mask_type="padding_causal", max_segments_per_seq=S
    )
    module = _nnx_mha(attention_fn=make_attention_fn())
    other = jnp.asarray(ids != 2)[..., None]
    run = nnx.jit(lambda m, x: m(x, mask=plan))
    changed = jnp.where(other, x, 50.0 * jnp.cos(x))
    np.testing.assert_array_equal(
        jnp.where(other, run(module, x), 0), jnp.where(other, run(module, changed), 0)
    )
    d_x = nnx.grad(lambda x: jnp.sum(jnp.where(other, module(x, mask=plan), 0.0) ** 2))(x)
    assert np.all(np.asarray(d_x)[ids == 2] == 0)
    assert np.any(np.asarray(d_x)[(ids != 2) & (ids > 0)] != 0)


def test_layer_without_rope_is_flax_multi_head_attention():
    """Same arguments and rngs: the parameters equal nnx.MultiHeadAttention's (names, shapes,
    values, biases included), and without RoPE so does the output."""
    ids, pos = _layout(11)
    x = _x(11)
    layer = PackedSelfAttention(
        4, F, num_kv_heads=2, rope_theta=None, rngs=nnx.Rngs(1), implementation="reference"
    )
    stock = _nnx_mha(attention_fn=make_attention_fn())
    ours = nnx.to_flat_state(nnx.state(layer, nnx.Param))
    theirs = nnx.to_flat_state(nnx.state(stock, nnx.Param))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (path, a), (_, b) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))
    plan = layer.plan(Segments.from_ids(ids, pos))
    live = _live(ids)
    np.testing.assert_allclose(
        jnp.where(live, layer(x, plan), 0), jnp.where(live, stock(x, mask=plan), 0), atol=1e-5
    )


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_dropout_and_sown_weights_follow_flax():
    """Attention-weight dropout (the dense path) draws Flax's bits: equal to Flax's attention
    with the dense mask, same rng; the sown weights equal Flax's too."""
    ids, pos = _layout(12)
    x = _x(12)
    plan = thdkit.plan_attention(
        Segments.from_ids(ids, pos), mask_type="padding_causal", max_segments_per_seq=S,
        implementation="reference",
    )  # fmt: skip
    live = _live(ids)
    outs, weights = [], []
    for fn, mask in ((make_attention_fn(), plan), (nnx.dot_product_attention, None)):
        module = _nnx_mha(attention_fn=fn, dropout_rate=0.5, deterministic=False)
        mask = _dense_mask(ids, pos) if mask is None else mask
        outs.append(module(x, mask=mask, rngs=nnx.Rngs(dropout=7), sow_weights=True))
        weights.append(module.attention_weights[0])
    np.testing.assert_allclose(jnp.where(live, outs[0], 0), jnp.where(live, outs[1], 0), atol=1e-5)
    rows = jnp.asarray(ids > 0)[:, None, :, None]
    np.testing.assert_allclose(
        jnp.where(rows, weights[0], 0), jnp.where(rows, weights[1], 0), atol=1e-6
    )


def test_make_attention_fn_errors():
    ids, pos = _layout(13)
    segments = Segments.from_ids(ids, pos)
    plan = thdkit.plan_attention(segments, mask_type="padding", max_segments_per_seq=S)
    with pytest.raises(TypeError, match="layout must be"):
        make_attention_fn((ids, pos))
    with pytest.raises(ValueError, match="the plan fixes mask_type"):
        make_attention_fn(plan, mask_type="padding")
    with pytest.raises(ValueError, match="implementation must be one of"):
        make_attention_fn(implementation="flash")
    q = jnp.ones((B, T, 2, 8))
    with pytest.raises(ValueError, match="is_causal=True"):
        make_attention_fn()(q, q, q, mask=plan, is_causal=True)
    with pytest.raises(ValueError, match="dropout_rng is required"):
        make_attention_fn(plan)(q, q, q, dropout_rate=0.1, deterministic=False)


# --- Names from the registries: strategies on a mesh, implementations ----------------------------


@pytest.mark.slow
def test_the_layer_runs_a_registered_strategy_on_a_mesh():
    """``strategy=`` picks any registered strategy; the layer runs it on the mesh (a counting spy
    around all_gather's body), giving the single-device output."""
    import dataclasses

    from thdkit import context_parallel

    built = []
    gather = context_parallel.STRATEGIES["all_gather"]

    def local(config):
        built.append(config.cp)
        return gather.local(config)

    context_parallel.register(dataclasses.replace(gather, name="spy_in_a_test", local=local))
    try:
        cp, layer = 2, _layer(HEADS[0], strategy="spy_in_a_test")
        ids, pos = _layout(7)
        x = _x(7)
        mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))
        ids_r, pos_r = (reorder.striped(a, cp=cp) for a in (ids, pos))
        rows = Segments(jnp.asarray(ids_r), jnp.asarray(pos_r), jnp.zeros_like(ids_r))
        x_r = reorder.striped(x, cp=cp, axis=1)
        out = layer(x_r, rows, max_segments_per_seq=S, mesh=mesh, axis_name="cp")
    finally:
        context_parallel.unregister("spy_in_a_test")
    assert built == [cp]
    real = (ids > 0)[..., None]
    want = layer(x, Segments.from_ids(ids, pos), max_segments_per_seq=S)
    got = reorder.unstriped(out, cp=cp, axis=1)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5)


def test_an_unknown_strategy_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"strategy must be one of 'ring', 'all_gather'.*'nope'"):
        _layer(HEADS[0], strategy="nope")


def test_implementation_names_come_from_the_kernel_registry():
    """An implementation registered at run time is accepted by the layer and make_attention_fn;
    once unregistered, both refuse it, listing the registered names."""
    from thdkit import kernels

    class Mine(type(kernels.get("reference"))):
        name = "mine_in_a_test"

    kernels.register(Mine())
    try:
        layer = _layer(HEADS[0], implementation="mine_in_a_test")
        ids, pos = _layout(8)
        out = layer(_x(8), Segments.from_ids(ids, pos), max_segments_per_seq=S)
        assert out.shape == (B, T, F)
        make_attention_fn(implementation="mine_in_a_test")
    finally:
        kernels.unregister("mine_in_a_test")
    for build in (
        lambda: _layer(HEADS[0], implementation="mine_in_a_test"),
        lambda: make_attention_fn(implementation="mine_in_a_test"),
    ):
        with pytest.raises(ValueError, match=r"implementation must be one of 'cudnn'.*mine_in"):
            build()
