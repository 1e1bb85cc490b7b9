"""A new implementation is one class and one register call: it runs through every entry point.

The implementation below is defined here, outside the package: the dense reference written
anew. Registered under its own name, it must run through ``thdkit.attention``, a plan,
``jax.grad``, ``attention_partial`` and every context-parallel strategy, and give what the
built-in reference gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import thdkit
from thdkit import kernels
from thdkit._src.kernels import base, partial
from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.masks import pair_mask
from thdkit._src.segments import Segments
from thdkit._src.synth import packed_segments

NAME = "dense_in_a_test"


class DenseInATest(kernels.Implementation):
    """Softmax over the whole [T_q, T_kv] mask; rows with no allowed key give zeros."""

    name = NAME

    def prepare(self, q, kv, config):
        return {"calls": jnp.zeros((), jnp.int32)}  # auxiliary data travels in the plan

    def forward(self, query, key, value, q, kv, aux, config, *, scale):
        allowed = pair_mask(q, kv, mask_type=config.mask_type, window_size=config.window_size)
        groups = query.shape[2] // key.shape[2]
        k, v = (jnp.repeat(x, groups, axis=2).astype(jnp.float32) for x in (key, value))
        logits = scale * jnp.einsum("bqhd,bkhd->bhqk", query.astype(jnp.float32), k)
        logits = jnp.where(allowed[:, None], logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1)
        safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
        weights = jnp.where(allowed[:, None], jnp.exp(logits - safe[..., None]), 0.0)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return out, lse.transpose(0, 2, 1)


@pytest.fixture
def registered():
    kernels.register(DenseInATest())
    yield NAME
    assert isinstance(kernels.unregister(NAME), DenseInATest)


def _inputs(seq_len=32, batch=2):
    ids, pos = packed_segments(
        np.random.default_rng(0), batch=batch, seq_len=seq_len, max_segments=3
    )
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(batch, seq_len, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, seq_len, 2, 8)), jnp.float32) for _ in range(2))
    return ids, pos, q, k, v


def test_it_is_listed_and_not_tried_by_default(registered):
    assert registered in kernels.names()
    assert registered not in kernels.default_order()
    assert registered in kernels.partial_implementations()


def test_attention_plan_and_grad(registered):
    ids, pos, q, k, v = _inputs()
    layout = dict(segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=3)
    want = thdkit.attention(q, k, v, **layout, implementation="reference")
    got = thdkit.attention(q, k, v, **layout, implementation=registered)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    plan = thdkit.plan_attention(
        Segments.from_ids(ids, pos),
        mask_type="padding_causal",
        max_segments_per_seq=3,
        implementation=registered,
    )
    assert plan.candidates == (registered,) and set(plan.aux) == {registered}
    np.testing.assert_allclose(thdkit.attention(q, k, v, plan=plan), want, atol=1e-5, rtol=1e-5)

    def loss(implementation, q, k, v):
        return jnp.sum(thdkit.attention(q, k, v, **layout, implementation=implementation) ** 2)

    for g, w in zip(
        jax.grad(lambda *a: loss(registered, *a), argnums=(0, 1, 2))(q, k, v),
        jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ring", "all_gather", "all_to_all"])
def test_every_context_parallel_strategy(registered, strategy):
    ids, pos, q, k, v = _inputs(seq_len=32, batch=1)
    q = jnp.concatenate([q, q], axis=2)  # 8 query heads over 4 key heads: all_to_all splits them
    k, v = (jnp.concatenate([x, x], axis=2) for x in (k, v))
    mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
    layout = dict(segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=3)
    want = thdkit.attention(q, k, v, **layout, implementation="reference")

    def loss(q):
        out = thdkit.context_parallel_attention(
            q,
            k,
            v,
            q_segments=Segments.from_ids(ids, pos),
            max_segments_per_seq=3,
            mesh=mesh,
            axis_name="cp",
            strategy=strategy,
            implementation=registered,
        )
        return jnp.sum(out**2), out

    (_, got), grad = jax.value_and_grad(loss, has_aux=True)(q)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    want_grad = jax.grad(
        lambda q: jnp.sum(thdkit.attention(q, k, v, **layout, implementation="reference") ** 2)
    )(q)
    np.testing.assert_allclose(grad, want_grad, atol=1e-4, rtol=1e-4)


def test_an_implementation_without_lse_cannot_serve_context_parallelism(registered):
    class NoLse(DenseInATest):
        name = "no_lse_in_a_test"
        returns_lse = False

    kernels.register(NoLse())
    try:
        assert "no_lse_in_a_test" not in kernels.partial_implementations()
        with pytest.raises(ValueError, match=r"no_lse_in_a_test.*log-sum-exp"):
            partial.check_partial_implementation("no_lse_in_a_test")
    finally:
        kernels.unregister("no_lse_in_a_test")


def test_register_rejects_what_is_not_an_implementation():
    with pytest.raises(TypeError, match="Implementation"):
        kernels.register(object())
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        thdkit.attention(
            *(jnp.zeros((1, 4, 1, 4)),) * 3,
            segment_ids_q=jnp.ones((1, 4), int),
            segment_pos_q=jnp.arange(4)[None],
            max_segments_per_seq=1,
            implementation="nope",
        )


def test_the_convention_of_strategies_replacing_and_unregistering(registered):
    """register(obj, replace=...) names it by obj.name; unregister returns what it removed;
    names() keeps registration order, a replaced one keeping its place."""
    before = kernels.names()
    assert before[-1] == registered
    replacement = DenseInATest()
    kernels.register(replacement, replace=True)
    assert kernels.names() == before and base.get(registered) is replacement
    removed = kernels.unregister(registered)
    assert removed is replacement and registered not in kernels.names()
    kernels.register(replacement)  # for the fixture
    assert kernels.names() == before


def test_the_old_kernel_spellings_warn():
    """Replacing without replace=True, and unregistering an unknown name, are deprecated: they
    warn, saying the new spelling, and still do what they did."""
    reference = base.get("reference")
    with pytest.warns(DeprecationWarning, match=r"'reference'.*replace=True"):
        kernels.register(reference)
    assert base.get("reference") is reference
    with pytest.warns(DeprecationWarning, match=r"unknown implementation 'nope'.*ValueError"):
        assert kernels.unregister("nope") is None
    assert "nope" not in kernels.names()


def test_an_implementation_overriding_check_layout_warns_and_its_check_still_decides(registered):
    """check_layout is renamed check_segments: a subclass overriding the old name warns when it
    is created, naming itself and the new name, and its check serves as check_segments."""
    with pytest.warns(DeprecationWarning, match=r"PaddingOnly overrides check_layout.*check_segm"):

        class PaddingOnly(DenseInATest):
            name = "padding_only_in_a_test"

            def check_layout(self, q, kv, config):
                if config.mask_type.uses_positions:
                    raise NotImplementedError("reads no positions")

    kernels.register(PaddingOnly())
    try:
        ids, pos, q, k, v = _inputs()
        layout = dict(segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=3)
        for mask_type in ("padding", "no_mask"):
            want = thdkit.attention(
                q, k, v, **layout, mask_type=mask_type, implementation=registered
            )
            got = thdkit.attention(
                q, k, v, **layout, mask_type=mask_type, implementation=PaddingOnly.name
            )
            np.testing.assert_array_equal(got, want)
        with pytest.raises(NotImplementedError, match="padding_only_in_a_test: reads no positions"):
            thdkit.attention(q, k, v, **layout, mask_type="causal", implementation=PaddingOnly.name)
    finally:
        kernels.unregister(PaddingOnly.name)


def test_calling_check_layout_warns_and_runs_check_segments():
    """The old name, called, or reached through super() by a subclass that still overrides it,
    warns and runs the check_segments of the class above."""

    class Short(DenseInATest):
        name = "short_in_a_test"

        def check_segments(self, q, kv, config):
            if q.seq_len > 4:
                raise NotImplementedError("rows of at most 4 tokens")

    with pytest.warns(DeprecationWarning, match="Shorter overrides check_layout"):

        class Shorter(Short):
            name = "shorter_in_a_test"

            def check_layout(self, q, kv, config):
                super().check_layout(q, kv, config)
                if q.seq_len > 2:
                    raise NotImplementedError("rows of at most 2 tokens")

    config = AttentionConfig.parse(mask_type="causal", window_size=None, max_segments_per_seq=1)

    def outcome(check, seg):
        try:
            check(seg, seg, config)
        except NotImplementedError as error:
            return str(error)
        return None

    def reason(most):
        return None if most is None else f"rows of at most {most} tokens"

    for length, short, shorter in ((2, None, None), (4, None, 2), (8, 4, 4)):
        seg = Segments.from_ids(np.ones((1, length), np.int32))
        assert outcome(Short().check_segments, seg) == reason(short)
        with pytest.warns(DeprecationWarning, match=r"Short\.check_layout is renamed check_segm"):
            assert outcome(Short().check_layout, seg) == outcome(Short().check_segments, seg)
        # Shorter's own check_layout is its check_segments; its super() call warns.
        with pytest.warns(DeprecationWarning, match=r"Shorter\.check_layout is renamed"):
            got = outcome(Shorter().check_segments, seg)
        assert got == reason(shorter)
