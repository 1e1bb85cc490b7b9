"""A kernel and a strategy written outside the package, each registered with one call, run at run
time (a ``jax.debug.callback`` counts executions, not traces) through every entry point: attention,
dot_product_attention, make_attention_fn, the Flax layer with and without a mesh, context
parallelism, ``thdkit bench attention`` and the harness; the strategy through
context_parallel_attention and the layer."""

from __future__ import annotations

import dataclasses
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import thdkit
from thdkit import context_parallel, kernels, reorder
from thdkit._src.synth import packed_segments

from . import harness

NAME, STRATEGY = "outside_in_a_test", "outside_strategy_in_a_test"
RUNS: Counter[str] = Counter()
B, T, H, HKV, D, S = 2, 32, 4, 2, 8, 3


class Outside(kernels.Implementation):
    """Dense softmax attention from :func:`thdkit.kernels.pair_mask`, in plain JAX (finite
    everywhere: no inf enters a gradient), counting its executions."""

    name = NAME

    def forward(self, query, key, value, q, kv, aux, config, *, scale):
        jax.debug.callback(lambda: RUNS.update([NAME]))
        allowed = kernels.pair_mask(
            q, kv, mask_type=config.mask_type, window_size=config.window_size
        )[:, None]  # [B, 1, T_q, T_kv]
        groups = query.shape[2] // key.shape[2]
        k, v = (jnp.repeat(x.astype(jnp.float32), groups, axis=2) for x in (key, value))
        logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(jnp.float32), k) * scale
        logits = jnp.where(allowed, logits, -1e30)
        top = jnp.max(logits, axis=-1, keepdims=True)
        weights = jnp.where(allowed, jnp.exp(logits - top), 0.0)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        some = total > 0
        out = jnp.einsum("bhqk,bkhd->bqhd", weights / jnp.where(some, total, 1.0), v)
        lse = jnp.where(some, top + jnp.log(jnp.where(some, total, 1.0)), -jnp.inf)[..., 0]
        return out, jnp.moveaxis(lse, 1, 2)


def _counting_all_gather(config):
    body = context_parallel.STRATEGIES["all_gather"].local(config)

    def local(*args, **kwargs):
        jax.debug.callback(lambda: RUNS.update([STRATEGY]))
        return body(*args, **kwargs)

    return local


@pytest.fixture(scope="module", autouse=True)
def registered():
    kernels.register(Outside())
    gather = context_parallel.STRATEGIES["all_gather"]
    context_parallel.register(
        dataclasses.replace(gather, name=STRATEGY, local=_counting_all_gather)
    )
    yield
    kernels.unregister(NAME)
    context_parallel.unregister(STRATEGY)


def _runs(name, call):
    """Runs ``call``, returns its value and how many times ``name`` executed meanwhile."""
    before = RUNS[name]
    value = jax.block_until_ready(call())
    jax.effects_barrier()
    return value, RUNS[name] - before


def _inputs():
    ids, pos = packed_segments(np.random.default_rng(0), batch=B, seq_len=T, max_segments=S)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, HKV, D)), jnp.float32) for _ in range(2))
    return ids, pos, q, k, v


def test_attention_forward_and_gradients():
    ids, pos, q, k, v = _inputs()
    layout = dict(segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=S)

    def loss(implementation, q, k, v):
        return jnp.sum(thdkit.attention(q, k, v, **layout, implementation=implementation) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    got, runs = _runs(NAME, lambda: grad(NAME, q, k, v))
    assert runs >= 1
    for g, w in zip(got, grad("reference", q, k, v), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_dot_product_attention():
    ids, pos, q, k, v = _inputs()

    def call(implementation):
        return thdkit.dot_product_attention(
            q, k, v, is_causal=True, segment_ids=ids, segment_positions=pos,
            max_segments_per_seq=S, implementation=implementation,
        )  # fmt: skip

    got, runs = _runs(NAME, lambda: call(NAME))
    assert runs == 1
    np.testing.assert_allclose(got, call("reference"), atol=1e-5, rtol=1e-5)


def test_flax_attention_fn_and_the_layer_without_a_mesh():
    nnx = pytest.importorskip("flax.nnx")
    from thdkit.flax import PackedSelfAttention, make_attention_fn

    ids, pos, _, _, _ = _inputs()
    segments = thdkit.Segments.from_ids(ids, pos)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, 16)), jnp.float32)
    outputs = {}
    for implementation in (NAME, "reference"):
        mha = nnx.MultiHeadAttention(
            num_heads=H, in_features=16, decode=False, rngs=nnx.Rngs(0),
            attention_fn=make_attention_fn(implementation=implementation, max_segments_per_seq=S),
        )  # fmt: skip
        layer = PackedSelfAttention(
            H, 16, num_kv_heads=HKV, implementation=implementation, rngs=nnx.Rngs(0)
        )
        outputs[implementation], runs = _runs(
            NAME,
            lambda mha=mha, layer=layer: (
                mha(x, mask=segments),
                layer(x, segments, max_segments_per_seq=S),
            ),
        )
        assert runs == (2 if implementation == NAME else 0)
    for got, want in zip(outputs[NAME], outputs["reference"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _striped_rows(cp):
    ids, pos, q, k, v = _inputs()
    rows = [reorder.striped(a, cp=cp, axis=1) for a in (q, k, v)]
    # The layout is built in document order, then reordered field by field like every per-token
    # array (its lengths stay the whole documents').
    segments = thdkit.Segments.from_ids(ids, pos)
    return (ids, pos, q, k, v), rows, jax.tree.map(lambda a: reorder.striped(a, cp=cp), segments)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ring", "all_gather", "all_to_all", STRATEGY])
def test_context_parallelism(strategy):
    cp = 2
    (ids, pos, q, k, v), rows, segments = _striped_rows(cp)
    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))
    out, runs = _runs(
        NAME,
        lambda: context_parallel_call(rows, segments, mesh, strategy=strategy, implementation=NAME),
    )
    assert runs >= cp
    if strategy == STRATEGY:
        _, strategy_runs = _runs(
            STRATEGY, lambda: context_parallel_call(rows, segments, mesh, strategy=strategy)
        )
        assert strategy_runs == cp
    want = thdkit.attention(
        q, k, v, segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=S,
        implementation="reference",
    )  # fmt: skip
    real = (ids > 0)[..., None, None]
    got = reorder.unstriped(out, cp=cp, axis=1)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5)


def context_parallel_call(rows, segments, mesh, **options):
    return thdkit.context_parallel_attention(
        *rows, q_segments=segments, max_segments_per_seq=S, mesh=mesh, axis_name="cp", **options
    )


@pytest.mark.slow
def test_the_layer_on_a_mesh_runs_both():
    nnx = pytest.importorskip("flax.nnx")
    from thdkit.flax import PackedSelfAttention

    cp = 2
    (ids, pos, _, _, _), _, segments = _striped_rows(cp)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, 16)), jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))
    layer = PackedSelfAttention(
        H, 16, num_kv_heads=HKV, implementation=NAME, strategy=STRATEGY, rngs=nnx.Rngs(0)
    )
    before = RUNS[STRATEGY]
    out, runs = _runs(
        NAME,
        lambda: layer(
            reorder.striped(x, cp=cp, axis=1), segments, max_segments_per_seq=S, mesh=mesh,
            axis_name="cp",
        ),
    )  # fmt: skip
    assert runs >= cp and RUNS[STRATEGY] - before == cp
    want = layer(x, thdkit.Segments.from_ids(ids, pos), max_segments_per_seq=S)
    real = (ids > 0)[..., None]
    got = reorder.unstriped(out, cp=cp, axis=1)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5)


def test_thdkit_bench_attention():
    pytest.importorskip("typer")
    from thdkit.bench.attention import AttentionBench, run_attention_bench

    config = AttentionBench(
        seq_lens=(64,), segments=(2,), heads=1, head_dim=8, implementations=(NAME,),
        repeats=1, warmup=0,
    )  # fmt: skip
    records, runs = _runs(NAME, lambda: run_attention_bench(config))
    assert runs >= 1
    assert {(r["implementation"], r["skip_reason"]) for r in records} == {(NAME, None)}


def test_the_harness_runs_it():
    assert harness.check_implementation(NAME) == {}
