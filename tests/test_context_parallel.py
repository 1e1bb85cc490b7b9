"""Every context-parallel strategy against single-device attention, on simulated CPU devices."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from thdkit import Segments
from thdkit._src.context_parallel import traffic
from thdkit.context_parallel import STRATEGIES, context_parallel_attention
from thdkit.kernels import attention

from .strategies import packed_row, reorder_pair

STRATEGY_NAMES = tuple(STRATEGIES)
DIM = 8
NUM_SEGMENTS = 4
ATOL = 1e-5
slow = pytest.mark.slow  # runs on a simulated multi-device mesh

# name -> (mask_type, window, cross-attention, H_q, H_kv, cp): the six mask types, windows, GQA
# and cross-attention, each compiled once per strategy for all four reorders.
CASES = {
    "no_mask": ("no_mask", None, False, 4, 4, 4),
    "padding_window": ("padding", (6, 3), False, 4, 4, 4),
    "causal_gqa": ("causal", None, False, 4, 2, 2),
    "padding_causal_window": ("padding_causal", (7, 0), False, 4, 4, 4),
    "causal_bottom_right_cross": ("causal_bottom_right", None, True, 4, 4, 4),
    "padding_causal_bottom_right_cross_gqa": (
        "padding_causal_bottom_right",
        (9, None),
        True,
        4,
        2,
        2,
    ),
}
REORDERS = ("none", "striped1", "striped2", "dual_chunk_swap")
# tests/test_ring.py holds the ring to the same reference on padding, causal, bottom-right,
# windowed and cross-attention GQA layouts: here it runs the two mask types that file leaves out.
MATRIX = [
    (case, strategy)
    for case in CASES
    for strategy in STRATEGY_NAMES
    if strategy != "ring" or case in ("no_mask", "causal_gqa")
]


def _rows(*rows: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


# Two rows of 64 tokens: one long document with tail padding; four documents and padding.
SELF = _rows(
    packed_row(64, [(61, 58)]), packed_row(64, [(13, 10), (9, 9), (22, 18), (11, 11)])
)  # fmt: skip
# Cross-attention: 32 queries, 64 keys, kv documents longer than the q ones (bottom-right reads
# the global document lengths).
CROSS_Q = _rows(packed_row(32, [(14, 12), (10, 10), (8, 8)]), packed_row(32, [(32, 30)]))
CROSS_KV = _rows(packed_row(64, [(30, 27), (20, 20), (14, 14)]), packed_row(64, [(60, 60)]))


def _mesh(cp: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:cp]), ("cp",))


def _random(shape: tuple[int, ...], seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _segments(ids: Any, pos: Any) -> Segments:
    """The Segments of rows as the strategies take them (any token order; lengths unread)."""
    return Segments(ids, pos, 0 * ids)


def _vjp(fn: Callable[..., Any], q, k, v, cotangent) -> tuple[Any, Any]:
    out, pull = jax.vjp(fn, q, k, v)
    return out, pull(cotangent)


@functools.cache
def _reference_fn(mask_type: str, window: Any) -> Callable[..., Any]:
    def run(q, k, v, cotangent, ids_q, pos_q, ids_kv, pos_kv):
        return _vjp(
            lambda q, k, v: attention(
                q, k, v, segment_ids_q=ids_q, segment_pos_q=pos_q, segment_ids_kv=ids_kv,
                segment_pos_kv=pos_kv, mask_type=mask_type, window_size=window,
                max_segments_per_seq=NUM_SEGMENTS, implementation="reference",
            ),
            q, k, v, cotangent,
        )  # fmt: skip

    return jax.jit(run)


@functools.cache
def _cp_fn(
    strategy: str,
    cp: int,
    mask_type: str,
    window: Any,
    cross: bool,
    implementation: str = "blockwise",
) -> Callable:
    """Jitted (out, grads) of one strategy; ids are traced, so every reorder reuses it."""

    def run(q, k, v, cotangent, ids_q, pos_q, ids_kv, pos_kv):
        kv_segments = _segments(ids_kv, pos_kv) if cross else None
        return _vjp(
            lambda q, k, v: context_parallel_attention(
                q, k, v, q_segments=_segments(ids_q, pos_q), kv_segments=kv_segments,
                mask_type=mask_type, window_size=window, max_segments_per_seq=NUM_SEGMENTS,
                mesh=_mesh(cp), axis_name="cp", strategy=strategy, implementation=implementation,
            ),
            q, k, v, cotangent,
        )  # fmt: skip

    return jax.jit(run)


@slow
@pytest.mark.parametrize(("case", "strategy"), MATRIX)
def test_matches_single_device_attention(case: str, strategy: str) -> None:
    _check_strategy(case, strategy, REORDERS, "blockwise")


@slow
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_the_pallas_kernels_run_every_strategy(strategy: str) -> None:
    """Each device attends its part with the Pallas kernels (interpret mode on CPU)."""
    _check_strategy("causal_gqa", strategy, ("striped2",), "pallas")


def _check_strategy(case: str, strategy: str, reorders: tuple[str, ...], implementation: str):
    """Output and gradients of one strategy equal single-device attention, for each reorder."""
    mask_type, window, cross, heads_q, heads_kv, cp = CASES[case]
    (ids_q, pos_q), (ids_kv, pos_kv) = (CROSS_Q, CROSS_KV) if cross else (SELF, SELF)
    batch, seq_q = ids_q.shape
    seq_kv = ids_kv.shape[1]
    q, cotangent = (_random((batch, seq_q, heads_q, DIM), seed) for seed in (0, 3))
    k, v = (_random((batch, seq_kv, heads_kv, DIM), seed) for seed in (1, 2))
    out_ref, grads_ref = _reference_fn(mask_type, window)(
        q, k, v, cotangent, ids_q, pos_q, ids_kv, pos_kv
    )
    run = _cp_fn(strategy, cp, mask_type, window, cross, implementation)
    for name in reorders:
        forward, inverse = reorder_pair(name, cp)
        tokens = functools.partial(forward, axis=1)
        out, grads = run(
            *(tokens(x) for x in (q, k, v, cotangent)),
            *(forward(x) for x in (ids_q, pos_q, ids_kv, pos_kv)),
        )
        np.testing.assert_allclose(inverse(out, axis=1), out_ref, atol=ATOL, rtol=0, err_msg=name)
        for label, grad, grad_ref in zip("qkv", grads, grads_ref, strict=True):
            np.testing.assert_allclose(
                inverse(grad, axis=1), grad_ref, atol=ATOL, rtol=0, err_msg=f"{name} d{label}"
            )


@slow
@pytest.mark.parametrize("strategy", ["all_gather", "all_to_all"])
def test_a_non_finite_document_stays_inside_it(strategy: str) -> None:
    """Poisoning document 2's keys and values leaves every other row's output and gradients
    bit-equal, through the collectives and their transposes."""
    cp, seq_len, heads = 4, 64, 4
    ids, pos = _rows(packed_row(seq_len, [(20, 20), (24, 20), (16, 16)]))
    forward, _ = reorder_pair("striped2", cp)
    q, k, v = (_random((1, seq_len, heads, DIM), seed) for seed in range(3))
    doc = jnp.asarray(ids == 2)[..., None, None]
    others = forward(jnp.asarray(ids != 2), axis=-1)[..., None, None]

    @jax.jit
    def run(k, v):
        def loss(q, k, v):
            out = context_parallel_attention(
                *(forward(x, axis=1) for x in (q, k, v)),
                q_segments=_segments(forward(ids), forward(pos)),
                max_segments_per_seq=NUM_SEGMENTS, mesh=_mesh(cp), axis_name="cp",
                strategy=strategy,
            )  # fmt: skip
            return jnp.sum(jnp.where(others, out, 0.0) ** 2), out

        (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    clean_out, clean_grads = run(k, v)
    out, grads = run(jnp.where(doc, jnp.nan, k), jnp.where(doc, jnp.nan, v))
    keep = np.asarray(others[0, :, 0, 0])
    np.testing.assert_array_equal(out[:, keep], clean_out[:, keep])
    assert np.isnan(np.asarray(out[:, ~keep & (forward(ids)[0] == 2)])).all()
    rows = np.asarray(ids[0] != 2)
    for grad, clean in zip(grads, clean_grads, strict=True):
        np.testing.assert_array_equal(grad[:, rows], clean[:, rows])


def _call(**overrides: Any) -> Any:
    x = jnp.zeros((1, 16, 2, 4))
    args = {
        "query": x,
        "key": x,
        "value": x,
        "q_segments": Segments.from_ids(np.ones((1, 16), np.int32)),
        "max_segments_per_seq": 1,
        "mesh": _mesh(4),
        "axis_name": "cp",
    } | overrides
    return context_parallel_attention(args.pop("query"), args.pop("key"), args.pop("value"), **args)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"strategy": "ulysses"}, ValueError, "unknown strategy 'ulysses'; valid: 'ring', "),
        ({"implementation": "cudnn"}, ValueError, "implementation='cudnn' cannot run context"),
        ({"strategy": "all_to_all"}, ValueError, "H_q=2 and H_kv=2 must be multiples of cp"),
        ({"axis_name": "sp", "strategy": "all_gather"}, ValueError, "axis_name 'sp' is not"),
        (
            {
                "q_segments": _segments(np.array([[1, 1, 0, 1] * 4]), np.arange(16)[None]),
                "strategy": "all_gather",
            },
            ValueError,
            r"q_segments row \(0, 0\), token 3: .*second run.*shard",
        ),
    ],
)
def test_invalid_arguments(overrides: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _call(**overrides)


def _collectives(jaxpr: Any, times: int = 1, *, trips: int = 1) -> list[tuple[str, Any, int]]:
    """(primitive, operand aval, times executed) of every collective: scan bodies multiplied by
    their length, while bodies by ``trips`` (the loops whose trip count the data sets: the
    ring's, ``cp - 1`` steps on the test's layouts), and of a ``cond`` the branch that moves
    the most (one branch runs)."""
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in traffic.RECEIVED:
            found += [(name, var.aval, times) for var in eqn.invars]
        inner = times * {"scan": eqn.params.get("length", 1), "while": trips}.get(name, 1)
        subs = []
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    subs.append(_collectives(sub, inner, trips=trips))
        if name == "cond" and subs:
            found += max(subs, key=lambda f: sum(a.size * t for _, a, t in f))
        else:
            found += [x for sub in subs for x in sub]
    return found


@slow
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("cross", [False, True])
def test_byte_formulas_match_the_traced_collectives(strategy: str, cross: bool) -> None:
    """The bench's closed-form bytes per device equal the collectives the program runs, forward
    and forward + backward (O(B·S) per-segment counts and spans left out, as the bench does)."""
    cp, batch, seq_q, heads_q, heads_kv, dim_v = 4, 2, 32, 4, 4, 6
    seq_kv = 64 if cross else seq_q
    q = jnp.zeros((batch, seq_q, heads_q, DIM))
    k = jnp.zeros((batch, seq_kv, heads_kv, DIM))
    v = jnp.zeros((batch, seq_kv, heads_kv, dim_v))

    def side(seq: int) -> Segments:
        return Segments.from_ids(np.ones((batch, seq), np.int32))

    layout = {"q_segments": side(seq_q), "kv_segments": side(seq_kv) if cross else None}

    def loss(q, k, v):
        out = context_parallel_attention(
            q, k, v, **layout, max_segments_per_seq=1, mesh=_mesh(cp), axis_name="cp",
            strategy=strategy,
        )  # fmt: skip
        return jnp.sum(out)

    shapes = traffic.Shapes(
        batch=batch, seq_q=seq_q, seq_kv=seq_kv, heads_q=heads_q, heads_kv=heads_kv, dim=DIM,
        dim_v=dim_v, itemsize=4, cross=cross,
    )  # fmt: skip
    expected = traffic.collective_bytes(strategy, shapes, cp=cp)
    for passes, fn in (("fwd", loss), ("bwd", jax.grad(loss, (0, 1, 2)))):
        counted = sum(
            traffic.RECEIVED[name](cp) * aval.size * aval.dtype.itemsize * times
            for name, aval, times in _collectives(jax.make_jaxpr(fn)(q, k, v).jaxpr, trips=cp - 1)
            if not (aval.ndim == 2 and aval.shape[1] == 2)  # per-segment bins, [B, S + 1]
        )
        total = expected.forward + (expected.backward if passes == "bwd" else 0)
        assert counted == pytest.approx(total), passes


@slow
def test_all_gather_backward_reduce_scatters_once() -> None:
    x = jnp.zeros((1, 32, 2, DIM))
    layout = {"q_segments": Segments.from_ids(np.ones((1, 32), np.int32))}

    def loss(k, v):
        return jnp.sum(
            context_parallel_attention(
                x, k, v, **layout, max_segments_per_seq=1, mesh=_mesh(4), axis_name="cp",
                strategy="all_gather",
            )
        )  # fmt: skip

    names = [
        name for name, _, _ in _collectives(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, x).jaxpr)
    ]
    # Forward: k, v, ids, positions gathered (independent: one step); backward: dk and dv.
    assert sorted(names) == ["all_gather"] * 4 + ["reduce_scatter"] * 2


_TWO_PROCESSES = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2,
                               process_id=int(sys.argv[2]), local_device_ids=[0, 1])
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from thdkit import Segments, attention, context_parallel_attention, reorder

    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = jax.make_mesh((4,), ("cp",))
    ids = np.array([[1] * 40 + [2] * 20 + [0] * 4], np.int32)
    pos = np.array([list(range(40)) + list(range(20)) + [0] * 4], np.int32)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 64, 4, 8)).astype(np.float32) for _ in range(3))
    expected = np.asarray(attention(q, k, v, segment_ids_q=ids, segment_pos_q=pos,
                                    max_segments_per_seq=2))

    def place(x, spec):
        x = reorder.striped(x, cp=4, axis=1)
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

    heads, tokens = P(None, "cp", None, None), P(None, "cp")
    args = [place(x, heads) for x in (q, k, v)]
    for strategy in ("ring", "all_gather", "all_to_all"):
        out = jax.jit(lambda q, k, v, ids, pos: context_parallel_attention(
            q, k, v, q_segments=Segments(ids, pos, 0 * ids), max_segments_per_seq=2, mesh=mesh,
            axis_name="cp", strategy=strategy))(*args, place(ids, tokens), place(pos, tokens))
        whole = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))(out)
        got = reorder.unstriped(np.asarray(whole.addressable_data(0)), cp=4, axis=1)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        print(strategy, "ok", flush=True)
    """
)


@slow
def test_two_processes_on_localhost(tmp_path: Path) -> None:
    """The same call across 2 processes of 2 CPU devices each (jax.distributed, gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two_processes.py"
    script.write_text(_TWO_PROCESSES)
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(port), str(rank)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=90)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
        assert output.count(" ok") == 3, output[-3000:]
