"""The attention entry point: argument checks, plans (jit, scan, shard_map, nothing of the layout
recomputed), the ordered choice of implementation, and the keyword form."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from thdkit._src.kernels.arguments import check_arguments
from thdkit._src.segments import Segments
from thdkit.kernels import AttentionPlan, attention, plan_attention

from . import harness
from .harness import S

BLOCKS = {"block_q": 16, "block_kv": 8}
TOL = harness.TOLERANCES["float32"]["forward"]


def _layout_and_inputs(seed: int, cross: bool = False) -> tuple:
    """``(layout, q, k, v)``: the harness's self- or cross-attention layout, random inputs."""
    layout = harness.layout(cross)
    return layout, *harness.layout_inputs(layout, seed)[:3]


def test_attention_self_attention_defaults_and_automatic_choice():
    """kv defaults to the query layout; on CPU the automatic choice is blockwise; jit and eager
    agree."""
    layout, q, k, v = _layout_and_inputs(9)
    common = harness.layout_keywords(layout, mask_type="causal_padding", **BLOCKS)
    out = attention(q, k, v, **common)

    def explicit_kv(q, k, v, ids, pos):
        layouts = dict(segment_ids_q=ids, segment_pos_q=pos, segment_ids_kv=ids, segment_pos_kv=pos)
        return attention(q, k, v, **(common | layouts), implementation="reference")

    explicit = jax.jit(explicit_kv)(q, k, v, layout["ids_q"], layout["pos_q"])
    harness.assert_close(out, explicit, TOL, "out")


def _call(**changes):
    x = jnp.zeros((1, 8, 2, 4))
    kwargs = dict(
        query=x,
        key=x,
        value=x,
        segment_ids_q=harness.ROW_IDS,
        segment_pos_q=harness.ROW_POS,
        max_segments_per_seq=2,
        implementation="reference",
    )
    kwargs.update(changes)
    return attention(kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value"), **kwargs)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"query": jnp.zeros((1, 8, 2, 4), jnp.int32)}, TypeError, "query must be float32"),
        ({"key": jnp.zeros((1, 8, 2, 4), jnp.bfloat16)}, TypeError, "share one dtype"),
        ({"value": jnp.zeros((8, 2, 4))}, ValueError, "value must have rank 4"),
        ({"key": jnp.zeros((2, 8, 2, 4))}, ValueError, "same batch size"),
        ({"value": jnp.zeros((1, 7, 2, 4))}, ValueError, "key and value must agree"),
        ({"key": jnp.zeros((1, 8, 2, 3))}, ValueError, "same head dim"),
        (
            {"key": jnp.zeros((1, 8, 3, 4)), "value": jnp.zeros((1, 8, 3, 4))},
            ValueError,
            "multiple of the key/value heads",
        ),
        (
            {"key": jnp.zeros((1, 9, 2, 4)), "value": jnp.zeros((1, 9, 2, 4))},
            ValueError,
            "needs T_kv == T_q",
        ),
        (
            {
                "segment_ids_q": jnp.ones((1, 7), jnp.int32),
                "segment_pos_q": jnp.ones((1, 7), jnp.int32),
            },
            ValueError,
            r"segment_ids_q must have shape \[B, T\] = \(1, 8\)",
        ),
        ({"segment_ids_q": jnp.ones((1, 8))}, TypeError, "segment_ids_q must be an integer"),
        ({"segment_ids_kv": jnp.ones((1, 8), jnp.int32)}, ValueError, "only segment_ids_kv"),
        ({"window_size": (1, 2, 3)}, ValueError, r"window_size must be None or a pair"),
        ({"window_size": (1.5, 0)}, TypeError, "window_size left bound must be a Python int"),
        ({"implementation": "flash"}, ValueError, "unknown implementation 'flash'.*'blockwise'"),
        ({"mask_type": "diagonal"}, ValueError, "unknown mask_type 'diagonal'"),
        ({"max_segments_per_seq": 1}, ValueError, "exceeds max_segments_per_seq=1"),
        (
            {"segment_pos_q": jnp.array([[0, 1, 1, 3, 0, 1, 2, 3]])},
            ValueError,
            r"segment_pos_q row 0, token 2: position 1 does not increase",
        ),
        ({"block_q": 0}, ValueError, "block_q must be >= 1"),
        ({"scale": jnp.float32(2.0)}, TypeError, "scale must be a Python float"),
        ({"scale": float("inf")}, ValueError, "scale must be finite"),
        ({"scale": np.float64("nan")}, ValueError, "scale must be finite"),
        ({"scale": True}, TypeError, "scale must be"),
        (
            {"key": jnp.zeros((1, 8, 0, 4)), "value": jnp.zeros((1, 8, 0, 4))},
            ValueError,
            "key has H_kv = 0",
        ),
        ({"query": jnp.zeros((1, 8, 0, 4))}, ValueError, "query has H_q = 0"),
        (
            {"query": jnp.zeros((1, 8, 2, 0)), "key": jnp.zeros((1, 8, 2, 0))},
            ValueError,
            "query has D = 0",
        ),
        ({"value": jnp.zeros((1, 8, 2, 0))}, ValueError, "value has D_v = 0"),
        ({"implementation": ["blockwise"]}, ValueError, "unknown implementation"),
        ({"block_kv": True}, TypeError, "block_kv must be an int"),
    ],
)
def test_errors_name_the_parameter(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


def test_scale_accepts_numpy_integers_and_empty_batches_return_empty():
    x = jnp.ones((1, 8, 2, 4))
    assert check_arguments(x, x, x, scale=np.int64(1))[3] == 1.0
    empty = jnp.zeros((0, 8, 2, 4))
    ids = jnp.zeros((0, 8), jnp.int32)
    out = attention(
        empty,
        empty,
        jnp.zeros((0, 8, 2, 3)),
        segment_ids_q=ids,
        segment_pos_q=ids,
        max_segments_per_seq=2,
    )
    assert out.shape == (0, 8, 2, 3) and out.dtype == jnp.float32


def _plan(layout, **options):
    q = Segments.from_ids(layout["ids_q"], layout["pos_q"])
    kv = None
    if layout["ids_kv"] is not layout["ids_q"]:
        kv = Segments.from_ids(layout["ids_kv"], layout["pos_kv"])
    return plan_attention(
        q, kv, mask_type="padding_causal", max_segments_per_seq=S, **BLOCKS, **options
    )


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_plan_gives_the_keyword_result_eagerly_under_jit_and_closed_over(cross):
    layout, q, k, v = _layout_and_inputs(3, cross)
    want = attention(q, k, v, **harness.layout_keywords(layout, **BLOCKS))
    plan = _plan(layout)
    assert isinstance(plan, AttentionPlan) and plan.implementation == "blockwise"
    assert plan.candidates == ("blockwise",) and plan.aux["blockwise"] is not None
    np.testing.assert_array_equal(attention(q, k, v, plan=plan), want)
    as_argument = jax.jit(lambda q, k, v, plan: attention(q, k, v, plan=plan))(q, k, v, plan)
    np.testing.assert_array_equal(as_argument, want)
    closed_over = jax.jit(lambda q, k, v: attention(q, k, v, plan=plan))(q, k, v)
    np.testing.assert_array_equal(closed_over, want)
    reference = attention(q, k, v, plan=_plan(layout, implementation="reference"))
    harness.assert_close(reference, want, TOL, "out")


def test_plan_is_reused_by_layers_under_scan():
    layout, q, k, v = _layout_and_inputs(5)
    plan = _plan(layout)
    scales = jnp.asarray([1.0, 0.5, 2.0])

    def layer(x, s):
        return attention(x * s, k, v, plan=plan)[..., :1].repeat(q.shape[-1], -1), None

    out, _ = jax.lax.scan(layer, q, scales)
    want = q
    for s in scales:
        want = attention(want * s, k, v, plan=plan)[..., :1].repeat(q.shape[-1], -1)
    harness.assert_close(out, want, TOL, "out")


def test_plan_passes_through_shard_map():
    layout, q, k, v = _layout_and_inputs(6)
    plan = _plan(layout)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    spec = P("data")
    plan_spec = jax.tree.map(lambda _: spec, plan)
    run = jax.shard_map(
        lambda q, k, v, plan: attention(q, k, v, plan=plan),
        mesh=mesh,
        in_specs=(spec, spec, spec, plan_spec),
        out_specs=spec,
        check_vma=False,
    )
    np.testing.assert_array_equal(jax.jit(run)(q, k, v, plan), attention(q, k, v, plan=plan))


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def test_attention_with_a_plan_recomputes_nothing_of_the_layout():
    """The keyword form computes run lengths and tile ranges (cummax, argmax); with a plan the
    traced computation holds none of them."""
    layout, q, k, v = _layout_and_inputs(7)
    plan = _plan(layout)
    with_plan = _primitives(
        jax.make_jaxpr(lambda q, k, v: attention(q, k, v, plan=plan))(q, k, v).jaxpr
    )
    keywords = harness.layout_keywords(layout, **BLOCKS)
    ids, pos = keywords.pop("segment_ids_q"), keywords.pop("segment_pos_q")
    without = _primitives(
        jax.make_jaxpr(
            lambda q, k, v, ids, pos: attention(
                q, k, v, segment_ids_q=ids, segment_pos_q=pos, **keywords
            )
        )(q, k, v, ids, pos).jaxpr
    )
    layout_ops = {"cummax", "argmax"}
    assert layout_ops <= without
    assert not layout_ops & with_plan


def test_plan_and_layout_keywords_together_is_an_error():
    layout, q, k, v = _layout_and_inputs(8)
    with pytest.raises(ValueError, match="not both; got plan and segment_ids_q, mask_type"):
        attention(q, k, v, plan=_plan(layout), segment_ids_q=layout["ids_q"], mask_type="padding")
    with pytest.raises(TypeError, match=r"q_segments must be a thdkit\.Segments"):
        plan_attention(layout["ids_q"], mask_type="padding", max_segments_per_seq=S)


def test_no_candidate_lists_every_reason():
    """On a machine without a GPU, asking for cuDNN names why; the plan says which one ran."""
    layout = harness.layout(False)
    if jax.default_backend() == "gpu":
        pytest.skip("checks the refusal without a GPU")
    with pytest.raises(
        NotImplementedError, match=r"no implementation can run.*cudnn: needs a CUDA GPU"
    ):
        _plan(layout, implementation="cudnn")
    assert _plan(layout).implementation == "blockwise"


@pytest.mark.parametrize(
    "window",
    [(None, 2**31 - 1), (2**31 - 1, None), (2**40, 0), (2**31 - 2, 2**31 - 2)],
    ids=str,
)
@pytest.mark.parametrize("mask", ["padding", "padding_causal_bottom_right", "causal"])
def test_huge_window_bounds_mean_unbounded(mask, window):
    layout, q, k, v = _layout_and_inputs(10)
    options = harness.layout_keywords(layout, **BLOCKS) | dict(mask_type=mask)
    want = attention(q, k, v, **options, window_size=window, implementation="reference")
    got = attention(q, k, v, **options, window_size=window)
    harness.assert_close(got, want, TOL, "out")
    if 0 not in window:  # both sides unbounded
        unbounded = attention(q, k, v, **options, implementation="reference")
        np.testing.assert_array_equal(want, unbounded)
    assert np.any(np.asarray(want) != 0)


@pytest.mark.parametrize(
    ("lengths", "error", "match"),
    [
        (
            np.array([[3, 3, 3, 3, 2, 0, 0, 0]], np.int32),
            ValueError,
            r"q_segments.lengths row 0, token 3",
        ),
        (
            np.array([[3, 3, 3, 3, 3, 0, 0, 0]], np.int32),
            ValueError,
            r"q_segments.lengths row 0, token 3",
        ),
        (np.array([[3, 3, 3, 0, 0, 0, 0, 0]], np.float32), TypeError, r"q_segments.lengths"),
        (np.array([3, 3, 3, 0, 0, 0, 0, 0], np.int32), ValueError, r"q_segments.lengths"),
    ],
)
def test_plan_validates_the_segments_lengths(lengths, error, match):
    """Lengths that vary inside a run, disagree with it, are floats or have another shape are
    refused: they would broadcast silently into wrong outputs."""
    ids = jnp.array([[1, 1, 1, 2, 2, 0, 0, 0]])
    pos = jnp.array([[0, 1, 2, 0, 1, 0, 0, 0]])
    good = Segments.from_ids(ids, pos)
    bad = Segments(good.ids, good.positions, jnp.asarray(lengths))
    with pytest.raises(error, match=match):
        plan_attention(bad, mask_type="padding_causal", max_segments_per_seq=2)
