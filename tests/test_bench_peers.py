"""Tests of the peers ``thdkit bench attention`` times (thdkit.bench.peers): each, as the bench
calls it, computes the packed attention of ``implementation="reference"`` (output and gradients),
refuses what it cannot run, and is reported skipped where its package is not installed.

ejkernel's tests skip without the extra ``thdkit[peers]`` (Python 3.11, jax 0.10); tokamax's
without ``thdkit[tokamax]`` (Python >= 3.12, the newest jax).
"""

from __future__ import annotations

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from thdkit._src import synth
from thdkit.bench.attention import (
    AttentionBench,
    attention_program,
    implementation_names,
    run_attention_bench,
)
from thdkit.bench.peers import PEERS, install_hint, peer_visited_fraction

MISSING = {
    "ejkernel": "ejkernel is not installed (extra thdkit[peers]; its release pins jax 0.10.x)",
    "tokamax": "tokamax is not installed (extra thdkit[tokamax]; Python >= 3.12)",
}
TOKAMAX = ("tokamax-xla", "tokamax-xla-chunked", "tokamax-xla-range")
PASSES = ("fwd", "fwd+bwd")


def _needs(names):
    for package, reason in MISSING.items():
        if any(name.startswith(package) for name in names):
            pytest.importorskip(package, reason=reason)


def _cell(seq_len=64, segments=5):
    rng = np.random.default_rng(3)
    ids, pos = synth.filled_segments(rng, batch=2, seq_len=seq_len, segments=segments)
    qkv = [jnp.asarray(rng.standard_normal((2, seq_len, 2, 8)), jnp.float32) for _ in range(3)]
    return (*qkv, jnp.asarray(ids), jnp.asarray(pos))


@pytest.mark.parametrize(
    ("mask_type", "names"),
    [
        ("padding_causal", ("blockwise", "blockwise-serial", "jax-nn-xla")),
        ("padding_causal", ("ejkernel-xla",)),
        ("padding_causal", TOKAMAX),  # the bench's mask
        ("padding", ("jax-nn-xla",)),  # the peers' own mask options
        ("padding", ("ejkernel-xla",)),
        ("padding", TOKAMAX),
    ],
)
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
def test_attention_programs_match_the_reference(mask_type, names, passes):
    """The programs the benchmark times compute the packed attention: the output, and with the
    backward the pullback of the output (dq, dk, dv)."""
    _needs(names)
    args = _cell()
    config = AttentionBench(mask_type=mask_type, block_q=16, block_kv=16)
    run = lambda name: jax.jit(attention_program(config, name, 5, passes))(*args)  # noqa: E731
    want = jax.tree.leaves(run("reference"))
    assert len(want) == (1 if passes == "fwd" else 4)
    for name in names:
        for got, expected in zip(jax.tree.leaves(run(name)), want, strict=True):
            np.testing.assert_allclose(got, expected, atol=3e-5, rtol=3e-5, err_msg=name)


def test_the_range_peer_is_not_the_whole_row():
    """A cell of several documents: the range peer differs from causal attention over the whole
    row, so the comparison above checks its document ranges."""
    _needs(["tokamax"])
    args = _cell()
    packed = attention_program(AttentionBench(), "tokamax-xla-range", 5, "fwd")(*args)
    whole = jax.nn.dot_product_attention(*args[:3], is_causal=True)
    assert not np.allclose(packed, whole, atol=1e-3)


@pytest.mark.parametrize("name", ["ejkernel-xla", "tokamax-xla-range", "jax-nn-cudnn"])
def test_attention_programs_refuse_what_they_cannot_run(name):
    _needs([name])
    spec = [jax.ShapeDtypeStruct((1, 64, 1, 8), jnp.float32)] * 3
    spec += [jax.ShapeDtypeStruct((1, 64), jnp.int32)] * 2
    bottom_right = AttentionBench(mask_type="padding_causal_bottom_right")
    windowed = AttentionBench(window_size=(8, 0))
    if name != "jax-nn-cudnn":
        for config in (bottom_right, windowed):
            with pytest.raises(NotImplementedError, match=f"{name}: top-left masks"):
                jax.eval_shape(attention_program(config, name, 2, "fwd"), *spec)
    elif jax.default_backend() == "cpu":
        with pytest.raises(NotImplementedError, match="needs a gpu backend"):
            jax.eval_shape(attention_program(bottom_right, name, 2, "fwd"), *spec)


def test_the_dense_mask_peers_take_every_mask_option():
    """tokamax on the dense mask, like jax.nn's, runs the bottom-right and windowed masks."""
    _needs(["tokamax"])
    args = _cell()
    for config in (AttentionBench(mask_type="padding_causal_bottom_right", window_size=(8, 0)),):
        want = attention_program(config, "reference", 5, "fwd")(*args)
        for name in ("tokamax-xla", "tokamax-xla-chunked"):
            got = attention_program(config, name, 5, "fwd")(*args)
            np.testing.assert_allclose(got, want, atol=3e-5, rtol=3e-5, err_msg=name)


@pytest.mark.parametrize(("package", "name"), [("ejkernel", "ejkernel-xla"), ("tokamax", TOKAMAX)])
def test_a_peer_not_installed_is_reported_so(monkeypatch, package, name):
    names = name if isinstance(name, tuple) else (name,)
    for module in [package, *(n for n in sys.modules if n.startswith(f"{package}."))]:
        monkeypatch.setitem(sys.modules, module, None)  # import <package>... now fails
    config = AttentionBench(
        seq_lens=(64,), segments=(2,), heads=1, head_dim=8, repeats=1, warmup=0,
        implementations=names,
    )  # fmt: skip
    records = run_attention_bench(config)
    assert [(r["implementation"], r["pass"]) for r in records] == [
        (n, p) for n in names for p in PASSES
    ]
    for missing in records:
        hint = install_hint(missing["implementation"])
        assert f"thdkit[{'peers' if package == 'ejkernel' else package}]" in hint
        assert missing["skip_reason"] == f"not installed: {hint}"
        assert missing["temp_bytes"] is None
        assert missing["latency_ms"] is missing["efficiency"] is missing["vs_blockwise"] is None


def test_the_peers_are_timed_with_blockwise_on_the_same_cells():
    """One run: blockwise and the tokamax peers, each pass timed, compared with blockwise."""
    _needs(["tokamax"])
    config = AttentionBench(
        seq_lens=(128,), segments=(1, 4), heads=1, head_dim=8, repeats=2, warmup=0,
        implementations=("blockwise", *TOKAMAX), dtype="float32",
    )  # fmt: skip
    records = run_attention_bench(config)
    cells = {(r["segments"], r["implementation"], r["pass"]) for r in records}
    assert cells == {(s, n, p) for s in (1, 4) for n in config.implementations for p in PASSES}
    for record in records:
        assert record["skip_reason"] is None and record["latency_ms"]["samples"] == 2
        assert record["vs_blockwise"] > 0 and record["efficiency"] > 0
        if record["implementation"] in TOKAMAX:
            assert record["visited_pair_fraction"] == peer_visited_fraction("tokamax-xla") == 1.0


def test_a_peer_over_the_memory_budget_is_not_run_like_jax_nn():
    """The dense peers are planned, then held to the run's memory budget as jax.nn's is."""
    names = ("jax-nn-xla", *(TOKAMAX if importlib.util.find_spec("tokamax") else ()))
    config = AttentionBench(
        seq_lens=(64,), segments=(2,), heads=1, head_dim=8, repeats=1, warmup=0,
        implementations=names, memory_limit_bytes=1,
    )  # fmt: skip
    for record in run_attention_bench(config):
        assert record["temp_bytes"] is not None, record["implementation"]
        assert record["skip_reason"].startswith("not run: needs "), record["implementation"]


def test_the_peers_are_benchmark_names():
    assert implementation_names()[-len(PEERS) :] == PEERS
    assert set(TOKAMAX) < set(PEERS) and len(set(PEERS)) == len(PEERS)
