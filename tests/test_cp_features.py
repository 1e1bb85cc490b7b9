"""Soft-capped logits and attention sinks through every context-parallel strategy.

On 2 simulated CPU devices, each built-in strategy with a soft cap, with sinks and with both
equals single-device ``thdkit.attention`` with the same options and the float64 oracle of
tests/harness.py (docs/semantics.md, "Soft-capped logits" and "Attention sinks"), forward and
gradients (dq, dk, dv and d sinks), under a causal and a padding mask, one cross-attention case,
grouped-query attention and a striped token order. A NaN in one document under sinks reaches no
other document's output or gradient, nor the sinks' gradient. A strategy that does not declare a
feature is refused it, naming both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import thdkit
from thdkit import context_parallel
from thdkit._src.mask_types import MaskType

from .harness import SCALE, S, allowed, layout, layout_inputs, partial_oracle
from .strategies import reorder_pair

CP = 2
CAP = 1.0
HEADS = (4, 2)  # GQA: 4 query heads over 2 key/value heads
TOL = dict(atol=2e-5, rtol=2e-5)
BUILT_INS = ("ring", "all_gather", "all_to_all")
# Every strategy runs each feature set once, each under its own mask, layout and token order:
# features -> (soft cap, sinks, mask type, cross-attention, token order).
CASES = {
    "cap": (CAP, False, MaskType.PADDING_CAUSAL, False, "striped2"),
    "sinks": (None, True, MaskType.PADDING, False, "dual_chunk_swap"),
    "both": (CAP, True, MaskType.PADDING_CAUSAL_BOTTOM_RIGHT, True, "striped1"),
}
pytestmark = pytest.mark.slow  # compiles context-parallel programs on a simulated mesh


def _loss_and_grads(attend):
    """``(out, grads)`` of ``sum(out * w)`` over the finite outputs, with respect to q, k, v
    and the sinks (where given)."""

    def run(q, k, v, w, sinks, *layout):
        def loss(q, k, v, sinks):
            out = attend(q, k, v, sinks, *layout)
            return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) * w), out

        arguments = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
        (_, out), grads = jax.value_and_grad(loss, arguments, has_aux=True)(q, k, v, sinks)
        return out, grads

    return jax.jit(run)


@functools.cache
def _single_device(mask: MaskType, cap: float | None) -> Any:
    return _loss_and_grads(
        lambda q, k, v, sinks, ids_q, pos_q, ids_kv, pos_kv: thdkit.attention(
            q, k, v, segment_ids_q=ids_q, segment_pos_q=pos_q, segment_ids_kv=ids_kv,
            segment_pos_kv=pos_kv, mask_type=mask, max_segments_per_seq=S, scale=SCALE,
            implementation="reference", logits_soft_cap=cap, sinks=sinks,
        )
    )  # fmt: skip


@functools.cache
def _context_parallel(strategy: str, mask: MaskType, cross: bool, cap: float | None) -> Any:
    mesh = Mesh(np.array(jax.devices()[:CP]), ("cp",))

    def attend(q, k, v, sinks, ids_q, pos_q, ids_kv, pos_kv):
        # Segments in any token order (the bare constructor checks nothing; lengths unread).
        kv = thdkit.Segments(ids_kv, pos_kv, 0 * ids_kv) if cross else None
        return context_parallel.context_parallel_attention(
            q, k, v, q_segments=thdkit.Segments(ids_q, pos_q, 0 * ids_q), kv_segments=kv,
            mask_type=mask, max_segments_per_seq=S, scale=SCALE, mesh=mesh, axis_name="cp",
            strategy=strategy, logits_soft_cap=cap, sinks=sinks,
        )  # fmt: skip

    return _loss_and_grads(attend)


def _inputs(cross: bool, seed: int = 1) -> tuple[np.ndarray, ...]:
    """``(q, k, v, w, sinks)`` float32 of the harness's layout; sinks of both signs, large
    enough to matter next to the logits."""
    q, k, v, w, _ = layout_inputs(layout(cross), seed, heads=HEADS)
    sinks = np.asarray(np.random.default_rng(seed).normal(size=HEADS[0]), np.float32)
    return q, k, v, w, sinks


def _on_the_mesh(run, order: str, q, k, v, w, sinks, ids):
    """``run`` on the tokens reordered by ``order``; the results in the original order."""
    forward, inverse = reorder_pair(order, CP)
    tokens = functools.partial(forward, axis=1)
    out, grads = run(*(tokens(x) for x in (q, k, v, w)), sinks, *(forward(x) for x in ids))
    grads = [np.asarray(inverse(g, axis=1)) for g in grads[:3]] + [np.asarray(g) for g in grads[3:]]
    return np.asarray(inverse(out, axis=1)), grads


@pytest.mark.parametrize("features", CASES)
@pytest.mark.parametrize("strategy", BUILT_INS)
def test_matches_single_device_and_the_oracle(strategy: str, features: str) -> None:
    cap, with_sinks, mask, cross, order = CASES[features]
    q, k, v, w, sinks = _inputs(cross)
    sinks = sinks if with_sinks else None
    lay = layout(cross)
    ids = tuple(lay[key] for key in ("ids_q", "pos_q", "ids_kv", "pos_kv"))
    run = _context_parallel(strategy, mask, cross, cap)
    out, grads = _on_the_mesh(run, order, q, k, v, w, sinks, ids)
    out_ref, grads_ref = _single_device(mask, cap)(q, k, v, w, sinks, *ids)
    out_64, _, grads_64 = partial_oracle(
        q, k, v, lay, mask, None, w_out=w, logits_soft_cap=cap, sinks=sinks
    )
    where = f"{strategy} {features}"
    np.testing.assert_allclose(out, out_ref, err_msg=where, **TOL)
    np.testing.assert_allclose(out, out_64, err_msg=f"{where} (oracle)", **TOL)
    assert len(grads) == len(grads_ref) == (4 if with_sinks else 3)
    names = ("dq", "dk", "dv", "d sinks")
    for name, grad, grad_ref, grad_64 in zip(names, grads, grads_ref, grads_64, strict=False):
        np.testing.assert_allclose(grad, grad_ref, err_msg=f"{where} {name}", **TOL)
        np.testing.assert_allclose(grad, grad_64, err_msg=f"{where} {name} (oracle)", **TOL)


@pytest.mark.parametrize("strategy", BUILT_INS)
def test_a_nan_reaches_no_other_document_nor_the_sinks_gradient(strategy: str) -> None:
    """A NaN value in one document of row 0 poisons the rows that read it (NaN, as on one
    device) and nothing else: every other output and every dq, dk, dv outside the document are
    bit-equal to the clean call's; the sinks' gradient is finite and equals one device's."""
    cap, _, mask, cross, order = CASES["sinks"]  # the programs of the test above
    lay = layout(cross)
    ids = tuple(lay[key] for key in ("ids_q", "pos_q", "ids_kv", "pos_kv"))
    q, k, v, w, sinks = _inputs(cross)
    row, target = 0, int(lay["ids_q"][0].max())
    token = int(np.flatnonzero(lay["ids_kv"][row] == target)[1])
    dirty_v = v.copy()
    dirty_v[row, token] = np.nan
    run = _context_parallel(strategy, mask, cross, cap)
    out_c, grads_c = _on_the_mesh(run, order, q, k, v, w, sinks, ids)
    out_d, grads_d = _on_the_mesh(run, order, q, k, dirty_v, w, sinks, ids)
    out_ref, grads_ref = _single_device(mask, cap)(q, k, dirty_v, w, sinks, *ids)
    read = allowed(lay, mask, None)[row, :, token]  # the queries of row 0 that read the NaN
    assert read.any()
    np.testing.assert_array_equal(np.isnan(out_d), np.isnan(np.asarray(out_ref)))
    assert np.isnan(out_d[row, read]).all() and not np.isnan(np.delete(out_d[row], read, 0)).any()
    other = ~((np.arange(lay["ids_q"].shape[0]) == row)[:, None] & (lay["ids_q"] == target))
    np.testing.assert_array_equal(out_d[other], out_c[other])
    for name, grad, grad_c in zip("qkv", grads_d[:3], grads_c[:3], strict=True):
        assert np.isfinite(grad).all(), f"{strategy}: d{name} is not finite"
        np.testing.assert_array_equal(grad[other], grad_c[other], err_msg=f"{strategy} d{name}")
    assert np.isfinite(grads_d[3]).all(), f"{strategy}: d sinks is not finite"
    np.testing.assert_allclose(grads_d[3], grads_ref[3], err_msg=f"{strategy} d sinks", **TOL)
    assert not np.allclose(grads_d[3], grads_c[3])  # the poisoned rows pass no sink gradient


def _call(strategy: str, *, implementation: str | None = None, **options: Any) -> Any:
    """One small call (checked and refused before anything compiles, in the refusal tests)."""
    mesh = Mesh(np.array(jax.devices()[:CP]), ("cp",))
    x = jnp.zeros((1, 8, 2, 4))
    segments = thdkit.Segments.from_ids(jnp.array([[1, 1, 1, 1, 2, 2, 2, 2]]))
    return context_parallel.context_parallel_attention(
        x, x, x, q_segments=segments, max_segments_per_seq=2, mesh=mesh, axis_name="cp",
        strategy=strategy, implementation=implementation, **options,
    )  # fmt: skip


@pytest.fixture
def undeclared() -> Any:
    """The all-gather strategy under another name, declaring no optional feature."""
    name = "all_gather_without_features"
    gather = context_parallel.STRATEGIES["all_gather"]
    context_parallel.register(dataclasses.replace(gather, name=name, features=frozenset()))
    yield name
    context_parallel.unregister(name)


def test_a_strategy_is_refused_the_features_it_does_not_declare(undeclared: str) -> None:
    for options, feature in (
        (dict(logits_soft_cap=CAP), "soft-capped logits"),
        (dict(sinks=jnp.zeros(2)), "attention sinks"),
    ):
        with pytest.raises(NotImplementedError, match=f"strategy='{undeclared}'.*{feature}"):
            _call(undeclared, **options)
    # Declaring the soft cap only: the sinks are still refused, the cap is not what is named.
    context_parallel.register(
        dataclasses.replace(
            context_parallel.get(undeclared), features=frozenset({"logits_soft_cap"})
        ),
        replace=True,
    )
    with pytest.raises(NotImplementedError, match=r"implement attention sinks \(") as error:
        _call(undeclared, logits_soft_cap=CAP, sinks=jnp.zeros(2))
    assert "soft-capped" not in str(error.value)


def test_the_built_ins_declare_every_feature() -> None:
    for name in BUILT_INS:
        assert context_parallel.get(name).features == {"logits_soft_cap", "sinks", "prefix"}


class _Uncapped(thdkit.kernels.Implementation):
    """A local attention that returns a log-sum-exp and implements no optional feature."""

    name = "uncapped_in_a_test"


def test_an_implementation_without_the_soft_cap_is_refused_it() -> None:
    thdkit.kernels.register(_Uncapped())
    try:
        with pytest.raises(NotImplementedError, match=r"uncapped_in_a_test: .*soft-capped"):
            _call("ring", implementation=_Uncapped.name, logits_soft_cap=CAP)
    finally:
        thdkit.kernels.unregister(_Uncapped.name)


def test_bad_options_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match=r"sinks must have shape \[H_q\] = \(2,\)"):
        _call("ring", sinks=jnp.zeros(3))
    with pytest.raises(TypeError, match="sinks must be a float array"):
        _call("ring", sinks=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="logits_soft_cap must be a positive finite"):
        _call("all_gather", logits_soft_cap=-1.0)
