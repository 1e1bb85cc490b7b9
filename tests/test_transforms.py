"""Every entry point under every transform, for every registered implementation that runs here.

A matrix: transforms {``jit``, ``vmap`` over an extra leading axis, ``jax.checkpoint``,
``lax.scan`` over layers, ``jax.shard_map`` with ``check_vma`` True and False} x the registry's
implementations that can run on this backend (blockwise, reference, and pallas in interpret mode
on CPU) x entry points {``thdkit.attention`` with a plan, ``thdkit.dot_product_attention`` with
segment ids, ``thdkit.flax.make_attention_fn()`` called as a function}. Each cell computes the
output and the gradients of a weighted sum of it with respect to query, key and value, under one
``jax.jit``, and compares them with the same entry point called without any transform.

The shard_map cells shard the batch (the layout with it) over two of the simulated CPU devices
(``--xla_force_host_platform_device_count``, set in the repository's conftest.py); one more test
runs a replicated plan under a head-sharded shard_map. Shapes are small and fixed (B=2, T=32,
H=2, D=8): each cell compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import thdkit
import thdkit.flax
from thdkit._src.kernels import base

from . import harness

B, T, H, D = 2, 32, 2, 8
S = 3
MASK = "padding_causal"
BLOCK = 8
LAYERS = 2
EXTRA = 2  # the vmapped leading axis
# Row 0: two documents and tail padding (positions counting on); row 1: three documents.
IDS = np.array([[1] * 10 + [2] * 14 + [0] * 8, [1] * 5 + [2] * 5 + [3] * 22], np.int32)
POS = np.array(
    [[*range(10), *range(22)], [*range(5), *range(5), *range(22)]],
    np.int32,
)


IMPLEMENTATIONS = tuple(n for n in base.names() if harness.refusal(n) is None)
"""The registered implementations that can run on this machine."""


# --- entry points: (q, k, v, layout) -> out, with the layout a pytree argument ----------------


def _layout(entry: str, implementation: str) -> Any:
    """The layout argument of an entry point: a plan, (ids, positions) or Segments."""
    segments = thdkit.Segments.from_ids(jnp.asarray(IDS), jnp.asarray(POS))
    if entry == "attention":
        return thdkit.plan_attention(
            segments,
            mask_type=MASK,
            max_segments_per_seq=S,
            block_q=BLOCK,
            block_kv=BLOCK,
            implementation=implementation,
        )
    if entry == "dot_product_attention":
        return jnp.asarray(IDS), jnp.asarray(POS)
    return segments


def _entry(entry: str, implementation: str) -> Callable[..., jax.Array]:
    if entry == "attention":
        return lambda q, k, v, plan: thdkit.attention(q, k, v, plan=plan)
    if entry == "dot_product_attention":
        return lambda q, k, v, layout: thdkit.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            segment_ids=layout[0],
            segment_positions=layout[1],
            max_segments_per_seq=S,
            implementation=implementation,
        )
    attention_fn = thdkit.flax.make_attention_fn(
        mask_type=MASK, max_segments_per_seq=S, implementation=implementation
    )
    return lambda q, k, v, segments: attention_fn(q, k, v, mask=segments)


ENTRIES = ("attention", "dot_product_attention", "flax")


# --- transforms: each maps (f, q, k, v, layout, weights) to the loss (a scalar) and its output -


def _inputs(extra: bool = False) -> tuple[np.ndarray, ...]:
    """q, k, v and the output's loss weights, float32; with a leading axis of EXTRA for vmap."""
    lead = (EXTRA, B) if extra else B
    return harness.random_inputs(batch=lead, seq_q=T, heads=(H, H), dim=D, dim_v=D)[:4]


def _plain(f, q, k, v, layout, w):
    out = f(q, k, v, layout)
    return jnp.sum(out * w), out


def _vmap(f, q, k, v, layout, w):
    out = jax.vmap(f, in_axes=(0, 0, 0, None))(q, k, v, layout)
    return jnp.sum(out * w), out


def _checkpoint(f, q, k, v, layout, w):
    out = jax.checkpoint(f)(q, k, v, layout)
    return jnp.sum(out * w), out


def _layer_scales() -> jax.Array:
    return jnp.linspace(0.5, 1.5, LAYERS)


def _scan(f, q, k, v, layout, w):
    def layer(x, scale):
        return f(x * scale, k, v, layout), None

    out, _ = jax.lax.scan(layer, q, _layer_scales())
    return jnp.sum(out * w), out


def _loop(f, q, k, v, layout, w):
    """The untransformed counterpart of :func:`_scan`: the layers as a Python loop."""
    out = q
    for scale in _layer_scales():
        out = f(out * scale, k, v, layout)
    return jnp.sum(out * w), out


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:2]), ("b",))


def _shard_map(check_vma: bool):
    def run(f, q, k, v, layout, w):
        batch = P("b")
        out = jax.shard_map(
            f,
            mesh=_mesh(),
            in_specs=(batch, batch, batch, batch),
            out_specs=batch,
            check_vma=check_vma,
        )(q, k, v, layout)
        return jnp.sum(out * w), out

    return run


TRANSFORMS: dict[str, Callable[..., Any]] = {
    "jit": _plain,
    "vmap": _vmap,
    "checkpoint": _checkpoint,
    "scan": _scan,
    "shard_map_check_vma": _shard_map(True),
    "shard_map_no_check_vma": _shard_map(False),
}
UNTRANSFORMED = {"vmap": "vmap", "scan": "scan"}  # the others compare with the plain call


# --- untransformed results ---------------------------------------------------------------------


def _value_and_grads(transform, f, q, k, v, layout, w):
    """(out, (dq, dk, dv)) of a transform's loss."""

    def loss(q, k, v):
        return transform(f, q, k, v, layout, w)

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@functools.cache
def _untransformed(entry: str, implementation: str, kind: str):
    """The entry point called eagerly, without any transform: the plain call, the vmap's
    per-slice calls stacked, or the layers as a Python loop."""
    f, layout = _entry(entry, implementation), _layout(entry, implementation)
    if kind == "vmap":
        q, k, v, w = _inputs(extra=True)
        slices = [_value_and_grads(_plain, f, q[e], k[e], v[e], layout, w[e]) for e in range(EXTRA)]
        return jax.tree.map(lambda *xs: np.stack(xs), *slices)
    q, k, v, w = _inputs()
    return _value_and_grads(_loop if kind == "scan" else _plain, f, q, k, v, layout, w)


# --- the matrix --------------------------------------------------------------------------------

# Cells that fail for reasons outside the kernels, with the reason (strict: they must fail).
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


def _cells():
    for transform in TRANSFORMS:
        for implementation in IMPLEMENTATIONS:
            for entry in ENTRIES:
                marks = []
                reason = KNOWN_FAILURES.get((transform, implementation, entry))
                if reason:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                yield pytest.param(
                    transform, implementation, entry, id=f"{transform}-{implementation}-{entry}",
                    marks=marks,
                )  # fmt: skip


def test_the_matrix_covers_the_registry():
    assert set(IMPLEMENTATIONS) >= {"blockwise", "reference", "pallas"}
    assert set(IMPLEMENTATIONS) <= set(base.names())


@pytest.mark.parametrize(("transform", "implementation", "entry"), list(_cells()))
def test_transform_matches_untransformed(transform, implementation, entry):
    f, layout = _entry(entry, implementation), _layout(entry, implementation)
    q, k, v, w = _inputs(extra=transform == "vmap")
    run = jax.jit(functools.partial(_value_and_grads, TRANSFORMS[transform], f))
    want = _untransformed(entry, implementation, UNTRANSFORMED.get(transform, ""))
    harness.assert_agree(run(q, k, v, layout, w), want, what=transform)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_replicated_plan_under_head_sharded_shard_map(implementation):
    """A plan replicated over the mesh (in_specs ``P()``) while the heads are sharded, with
    ``check_vma=True``: the kernels' loops combine replicated layout data with varying arrays."""
    f, plan = _entry("attention", implementation), _layout("attention", implementation)
    q, k, v, w = _inputs()
    heads = P(None, None, "b")

    def sharded(f, q, k, v, plan, w):
        out = jax.shard_map(
            f,
            mesh=_mesh(),
            in_specs=(heads, heads, heads, P()),
            out_specs=heads,
        )(q, k, v, plan)
        return jnp.sum(out * w), out

    got = jax.jit(functools.partial(_value_and_grads, sharded, f))(q, k, v, plan, w)
    harness.assert_agree(got, _untransformed("attention", implementation, ""), what="heads")
