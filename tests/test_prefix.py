"""Per-document prefix-LM masks: a pair of one document is also allowed where both tokens lie in
the document's prefix (its first P tokens by position), whatever the mask type and window.

Against the float64 oracle of tests/harness.py (``allowed`` with ``pl_q``/``pl_kv``): the mask
itself, the reference and blockwise forward and gradients, tile ranges, the checks of flags and
of the ``prefix_lengths`` field, packing, isolation and context parallelism.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh

import thdkit
import thdkit.data
from thdkit import Segments
from thdkit._src.host import NUMPY
from thdkit._src.kernels.tiles import tile_ranges
from thdkit._src.mask_types import MaskType
from thdkit.context_parallel import STRATEGIES

from .harness import SCALE, WINDOW, S, allowed, check_partial, layout, layout_inputs, partial_grads
from .strategies import np_run_lengths, packed_row

# --- Layouts with prefixes -----------------------------------------------------------------------


def prefix_lengths(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int32 [B, T]: a random prefix length per document, in [0, its length] (0 on padding)."""
    out = np.zeros(ids.shape, np.int32)
    for b, row in enumerate(ids):
        lengths = np_run_lengths(row)
        for doc in np.unique(row[row != 0]):
            here = row == doc
            out[b, here] = rng.integers(0, lengths[here][0] + 1)
    return out


@functools.cache
def prefix_layout(cross: bool) -> dict[str, np.ndarray]:
    """tests/harness.py's layout with random prefix lengths on both sides."""
    lay = dict(layout(cross))
    rng = np.random.default_rng(11 if cross else 5)
    lay["pl_q"] = prefix_lengths(lay["ids_q"], rng)
    lay["pl_kv"] = prefix_lengths(lay["ids_kv"], rng) if cross else lay["pl_q"]
    return lay


def sides(lay: dict[str, np.ndarray], xp=np) -> tuple[Segments, Segments]:
    """Both sides' Segments of ``lay`` with its prefix lengths (NumPy or JAX fields)."""
    q, kv = (
        Segments(
            *(xp.asarray(a, np.int32) for a in (lay[f"ids_{s}"], lay[f"pos_{s}"])),
            xp.asarray(np.stack([np_run_lengths(r) for r in lay[f"ids_{s}"]]), np.int32),
            xp.asarray(lay[f"pl_{s}"], np.int32),
        )
        for s in ("q", "kv")
    )
    return q, kv


# --- The rule ------------------------------------------------------------------------------------

# A row of eight tokens: document 1 (five tokens, a prefix of three), document 2 (two tokens, a
# prefix of one), padding.
ROW_IDS = np.array([[1, 1, 1, 1, 1, 2, 2, 0]])
ROW_FLAGS = np.array([[1, 1, 1, 0, 0, 1, 0, 0]], bool)
ROW_CAUSAL = np.array(
    [
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
)


def test_worked_example_causal_with_a_window():
    seg = Segments.from_ids(ROW_IDS, prefix=ROW_FLAGS)
    np.testing.assert_array_equal(seg.prefix_lengths, [[3, 3, 3, 3, 3, 1, 1, 0]])
    got = thdkit.kernels.pair_mask(seg, seg, mask_type=MaskType.CAUSAL, window_size=None)
    np.testing.assert_array_equal(got[0], ROW_CAUSAL)
    # A window of one key to the left limits every pair but those inside a prefix.
    windowed = thdkit.kernels.pair_mask(seg, seg, mask_type=MaskType.CAUSAL, window_size=(1, 0))
    np.testing.assert_array_equal(
        windowed[0, 3:5, :5], [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    )  # token 3 (outside the prefix) still sees only tokens 2 and 3
    np.testing.assert_array_equal(windowed[0, :3, :3], np.ones((3, 3)))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("window", [None, WINDOW], ids=["nowindow", "window"])
@pytest.mark.parametrize("mask", list(MaskType), ids=lambda m: m.value)
def test_pair_mask_is_the_rule(mask, window, cross):
    lay = prefix_layout(cross)
    q, kv = sides(lay)
    got = thdkit.kernels.pair_mask(q, kv, mask_type=mask, window_size=window)
    np.testing.assert_array_equal(got, allowed(lay, mask, window))
    # The prefix only adds pairs, all inside their documents.
    plain = {k: v for k, v in lay.items() if not k.startswith("pl_")}
    base = allowed(plain, mask, window)
    assert np.all(got >= base)
    assert not np.any(got & (lay["ids_q"][:, :, None] != lay["ids_kv"][:, None, :]))


def test_padding_without_a_window_is_unchanged():
    lay = prefix_layout(False)
    q, kv = sides(lay)
    plain = Segments(q.ids, q.positions, q.lengths)
    for mask in (MaskType.PADDING, MaskType.NO_MASK):
        np.testing.assert_array_equal(
            thdkit.kernels.pair_mask(q, kv, mask_type=mask, window_size=None),
            thdkit.kernels.pair_mask(plain, plain, mask_type=mask, window_size=None),
        )


# --- Forward and gradients against the float64 oracle --------------------------------------------

CASES = {
    "causal_self": (MaskType.CAUSAL, None, False),
    "bottom_right_cross": (MaskType.CAUSAL_BOTTOM_RIGHT, None, True),
    "padding_causal_window_self": (MaskType.PADDING_CAUSAL, WINDOW, False),
    "padding_causal_window_cross": (MaskType.PADDING_CAUSAL, WINDOW, True),
}


@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_the_oracle(implementation, case):
    mask, window, cross = CASES[case]
    lay = prefix_layout(cross)
    q_seg, kv_seg = sides(lay, jnp)
    arrays = layout_inputs(lay, seed=1)
    partial = functools.partial(
        thdkit.kernels.attention_partial, q_segments=q_seg, kv_segments=kv_seg, mask_type=mask,
        window_size=window, scale=SCALE, implementation=implementation, block_q=8, block_kv=8,
    )  # fmt: skip
    got = jax.jit(lambda *a: partial_grads(partial, *a))(*map(jnp.asarray, arrays))
    check_partial(got, arrays, lay, mask, window, what=f"{implementation} {case}")


def test_plan_attention_runs_blockwise_and_refuses_the_others():
    lay = prefix_layout(False)
    q_seg, _ = sides(lay)
    plan = thdkit.plan_attention(q_seg, mask_type="causal", max_segments_per_seq=S)
    assert plan.config.prefix and "prefix" in plan.config.features
    assert plan.candidates[0] == "blockwise"  # cuDNN is refused the prefix
    q, k, v = layout_inputs(lay, seed=2)[:3]
    out = thdkit.attention(q, k, v, plan=plan, scale=SCALE)
    reference = thdkit.attention(
        q, k, v, scale=SCALE,
        plan=thdkit.plan_attention(
            q_seg, mask_type="causal", max_segments_per_seq=S, implementation="reference"
        ),
    )  # fmt: skip
    np.testing.assert_allclose(out, reference, atol=5e-6, rtol=5e-6)
    for name in ("pallas", "cudnn"):
        with pytest.raises(NotImplementedError, match="prefix-LM"):
            thdkit.plan_attention(
                q_seg, mask_type="causal", max_segments_per_seq=S, implementation=name
            )
    with pytest.raises(NotImplementedError, match="prefix-LM"):
        thdkit.kernels.attention_partial(
            q, k, v, q_segments=q_seg, kv_segments=q_seg, mask_type="causal", window_size=None,
            scale=SCALE, implementation="pallas",
        )  # fmt: skip


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_blockwise_equals_the_reference_on_random_documents(data):
    seq_len = 16
    ids = np.zeros((1, seq_len), np.int32)
    flags = np.zeros((1, seq_len), bool)
    sizes = data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))
    start = 0
    for doc, size in enumerate(sizes, start=1):
        size = min(size, seq_len - start)
        if size <= 0:
            break
        ids[0, start : start + size] = doc
        flags[0, start : start + data.draw(st.integers(0, size))] = True
        start += size
    seg = Segments.from_ids(ids, prefix=flags)
    mask = data.draw(st.sampled_from([MaskType.CAUSAL, MaskType.CAUSAL_BOTTOM_RIGHT]))
    q, k, v = (jnp.asarray(a) for a in layout_inputs({"ids_q": ids}, seed=3)[:3])
    assert _blockwise_vs_reference(mask)(q, k, v, jax.tree.map(jnp.asarray, seg)) < 1e-5


@functools.cache
def _blockwise_vs_reference(mask):
    def run(q, k, v, seg):
        outs = [
            thdkit.kernels.attention_partial(
                q, k, v, q_segments=seg, kv_segments=seg, mask_type=mask, window_size=None,
                scale=SCALE, implementation=name, block_q=4, block_kv=4,
            )[0]
            for name in ("blockwise", "reference")
        ]  # fmt: skip
        return jnp.max(jnp.abs(outs[0] - outs[1]))

    return jax.jit(run)


def test_a_nan_in_one_document_reaches_no_other():
    lay = prefix_layout(False)
    q_seg, _ = sides(lay, jnp)
    q, k, v, w_out, w_lse = (jnp.asarray(a) for a in layout_inputs(lay, seed=4))
    # A key inside the prefix of row 0's first document: every prefix query of it reads it.
    row = lay["ids_q"][0]
    doc = row[row != 0][0]
    token = int(np.flatnonzero(row == doc)[0])
    poisoned = k.at[0, token].set(jnp.nan)
    partial = functools.partial(
        thdkit.kernels.attention_partial, q_segments=q_seg, kv_segments=q_seg,
        mask_type="causal", window_size=None, scale=SCALE, implementation="blockwise",
        block_q=8, block_kv=8,
    )  # fmt: skip
    run = jax.jit(lambda q, k, v: partial_grads(partial, q, k, v, w_out, w_lse))
    clean, bad = run(q, k, v), run(q, poisoned, v)
    other = np.ones(lay["ids_q"].shape, bool)
    other[0] = row != doc
    for label, c, b in zip(("out", "lse", "dq", "dk", "dv"), (*clean[:2], *clean[2]),
                           (*bad[:2], *bad[2]), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(b)[other], np.asarray(c)[other], err_msg=label)


# --- Tile ranges ---------------------------------------------------------------------------------


def _tiles_with_pairs(mask_rows: np.ndarray, block_q: int, block_kv: int) -> np.ndarray:
    """bool [B, NQ, NK]: the (query tile, key tile) pairs holding an allowed pair."""
    b, t_q, t_kv = mask_rows.shape
    nq, nk = -(-t_q // block_q), -(-t_kv // block_kv)
    padded = np.zeros((b, nq * block_q, nk * block_kv), bool)
    padded[:, :t_q, :t_kv] = mask_rows
    return padded.reshape(b, nq, block_q, nk, block_kv).any(axis=(2, 4))


@pytest.mark.parametrize("mask", [MaskType.CAUSAL, MaskType.PADDING_CAUSAL_BOTTOM_RIGHT])
def test_tile_ranges_visit_exactly_the_tiles_with_allowed_pairs(mask):
    rows = [
        packed_row(32, [(9, 9), (5, 5), (14, 14), (4, 2)]),
        packed_row(32, [(20, 20), (3, 3), (6, 6), (3, 3)]),
    ]
    ids, pos = (np.stack([r[i] for r in rows]) for i in (0, 1))
    flags = (pos < np.array([[6], [13]])) & (ids != 0)
    flags[1, 20:23] = False  # document 2 of row 1: no prefix
    seg = Segments.from_ids(ids, pos, prefix=flags)
    want = _tiles_with_pairs(
        np.asarray(thdkit.kernels.pair_mask(seg, seg, mask_type=mask, window_size=None)), 4, 4
    )
    got = tile_ranges(seg, seg, mask_type=mask, window_size=None, block_q=4, block_kv=4, ops=NUMPY)
    span = np.arange(want.shape[-1])
    visited = (span >= got.lo[..., None]) & (span < got.hi[..., None])
    np.testing.assert_array_equal(visited, want)
    # Without the prefix the blockwise method would visit fewer tiles: the prefix costs tiles.
    plain = Segments(seg.ids, seg.positions, seg.lengths)
    without = tile_ranges(
        plain, plain, mask_type=mask, window_size=None, block_q=4, block_kv=4, ops=NUMPY
    )
    assert int(np.sum(without.hi - without.lo)) < int(np.sum(got.hi - got.lo))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("window", [None, WINDOW, (1, None)], ids=["none", "both", "left"])
@pytest.mark.parametrize("mask", [MaskType.PADDING_CAUSAL, MaskType.CAUSAL_BOTTOM_RIGHT])
def test_tile_ranges_cover_every_pair_and_host_equals_device(mask, window, cross):
    lay = prefix_layout(cross)
    host, device = sides(lay), sides(lay, jnp)
    options = dict(mask_type=mask, window_size=window, block_q=4, block_kv=8)
    on_host = tile_ranges(*host, **options, ops=NUMPY)
    on_device = jax.jit(lambda q, kv: tile_ranges(q, kv, **options))(*device)
    np.testing.assert_array_equal(on_host.lo, on_device.lo)
    np.testing.assert_array_equal(on_host.hi, on_device.hi)
    want = _tiles_with_pairs(allowed(lay, mask, window), 4, 8)
    span = np.arange(want.shape[-1])
    visited = (span >= on_host.lo[..., None]) & (span < on_host.hi[..., None])
    assert not np.any(want & ~visited), "an allowed pair outside the visited tiles"


# --- Construction and checks ---------------------------------------------------------------------


def test_with_prefix_reads_reordered_rows():
    seg = Segments.from_ids(ROW_IDS, prefix=ROW_FLAGS)
    striped = jax.tree.map(lambda a: thdkit.reorder.striped(a, cp=2), seg)
    again = Segments(striped.ids, striped.positions, striped.lengths).with_prefix(
        thdkit.reorder.striped(ROW_FLAGS, cp=2)
    )
    np.testing.assert_array_equal(again.prefix_lengths, striped.prefix_lengths)
    # Traced flags give the same prefix lengths.
    traced = jax.jit(lambda s, f: s.with_prefix(f).prefix_lengths)(
        jax.tree.map(jnp.asarray, Segments.from_ids(ROW_IDS)), jnp.asarray(ROW_FLAGS)
    )
    np.testing.assert_array_equal(traced, seg.prefix_lengths)


@pytest.mark.parametrize(
    "flags, error, match",
    [
        (ROW_FLAGS.astype(np.int32), TypeError, "prefix must be a bool array.*int32"),
        (ROW_FLAGS.astype(np.float32), TypeError, "prefix must be a bool array.*float32"),
        (ROW_FLAGS[:, :7], ValueError, r"prefix must have the shape of the segment ids, \(1, 8\)"),
        (
            np.array([[1, 1, 1, 0, 0, 1, 0, 1]], bool),
            ValueError,
            r"prefix row 0, token 7: flagged, but the token is padding",
        ),
        (
            np.array([[1, 0, 1, 0, 0, 1, 0, 0]], bool),
            ValueError,
            r"prefix row 0, token 1: not flagged at position 1, but document 1 flags position 2",
        ),
        (
            np.array([[1, 1, 1, 0, 0, 0, 1, 0]], bool),
            ValueError,
            r"prefix row 0, token 5: not flagged at position 0, but document 2 flags position 1",
        ),
    ],
)
def test_bad_flags_are_refused_naming_row_and_token(flags, error, match):
    with pytest.raises(error, match=match):
        Segments.from_ids(ROW_IDS, prefix=flags)
    with pytest.raises(error, match=match):
        Segments.from_ids(jnp.asarray(ROW_IDS)).with_prefix(jnp.asarray(flags))


@pytest.mark.parametrize(
    "prefix, error, match",
    [
        ([[3, 3, 3, 3, 3, 1, 1, 1]], ValueError, r"token 7: 1 on a padding token"),
        ([[-1, -1, -1, -1, -1, 1, 1, 0]], ValueError, r"token 0: -1 is negative"),
        ([[6, 6, 6, 6, 6, 1, 1, 0]], ValueError, r"token 0: 6 exceeds the document's length 5"),
        ([[3, 3, 2, 3, 3, 1, 1, 0]], ValueError, r"token 2: 2 differs from 3 at token 0"),
    ],
)
def test_a_bad_prefix_lengths_field_is_refused(prefix, error, match):
    base = Segments.from_ids(ROW_IDS)
    seg = Segments(base.ids, base.positions, base.lengths, prefix)
    with pytest.raises(error, match="q_segments.prefix_lengths row 0, " + match):
        thdkit.plan_attention(seg, mask_type="causal", max_segments_per_seq=2)


def test_prefix_lengths_dtype_and_shape_are_checked_under_jit_too():
    base = Segments.from_ids(jnp.asarray(ROW_IDS))

    def plan(seg):
        return thdkit.plan_attention(seg, mask_type="causal", max_segments_per_seq=2).config

    wrong_dtype = Segments(base.ids, base.positions, base.lengths, base.lengths.astype(jnp.int16))
    with pytest.raises(TypeError, match="prefix_lengths must be int32"):
        jax.jit(plan)(wrong_dtype)
    wrong_shape = Segments(base.ids, base.positions, base.lengths, base.lengths[:, :4])
    with pytest.raises(ValueError, match="prefix_lengths must have the shape"):
        jax.jit(plan)(wrong_shape)


def test_segments_without_prefix_keep_three_leaves_and_metadata_refuses_a_prefix():
    plain = Segments.from_ids(ROW_IDS)
    assert plain.prefix_lengths is None and len(jax.tree.leaves(plain)) == 3
    seg = plain.with_prefix(ROW_FLAGS)
    assert len(jax.tree.leaves(seg)) == 4
    from thdkit._src.metadata import segments_metadata

    with pytest.raises(ValueError, match="prefix_lengths"):
        segments_metadata(seg, mask_type=MaskType.CAUSAL, max_segments_per_seq=2)


# --- Packing -------------------------------------------------------------------------------------


def _prompt_docs():
    return [
        {"inputs": np.arange(1, n + 1), "prompt": (np.arange(n) < p).astype(np.int32)}
        for n, p in ((3, 2), (2, 0), (4, 4), (1, 1))
    ]


def test_pack_marks_the_prefix_and_reorders_it():
    options = dict(
        seq_len=8, max_segments_per_seq=2, batch_size=2, features=("inputs", "prompt"),
        prefix_feature="prompt",
    )  # fmt: skip
    batch = next(iter(thdkit.data.pack(grain.MapDataset.source(_prompt_docs()), **options)))
    seg = batch["segments"]
    np.testing.assert_array_equal(seg.ids, [[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(
        seg.prefix_lengths, [[2, 2, 2, 0, 0, 0, 0, 0], [4, 4, 4, 4, 1, 0, 0, 0]]
    )
    striped = next(iter(thdkit.data.pack(grain.MapDataset.source(_prompt_docs()), **options, cp=2)))
    np.testing.assert_array_equal(
        striped["segments"].prefix_lengths, thdkit.reorder.striped(seg.prefix_lengths, cp=2)
    )


def test_pack_refuses_marks_that_are_not_the_first_tokens():
    docs = [{"inputs": np.arange(1, 4), "prompt": np.array([0, 1, 0])}]
    rows = thdkit.data.pack(
        grain.MapDataset.source(docs), seq_len=4, max_segments_per_seq=1, batch_size=1,
        features=("inputs", "prompt"), prefix_feature="prompt",
    )  # fmt: skip
    with pytest.raises(ValueError, match="pack: prefix_feature prompt row 0, token 0"):
        next(iter(rows))
    with pytest.raises(ValueError, match="prefix_feature must be one of features"):
        thdkit.data.pack(
            grain.MapDataset.source(docs), seq_len=4, max_segments_per_seq=1, batch_size=1,
            prefix_feature="prompt",
        )  # fmt: skip


# --- Context parallelism -------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["plain", "striped"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_context_parallel_attention_matches_one_device(strategy, order):
    """Outputs and gradients on four ranks (two for all-to-all) equal one device's: the prefix
    lengths travel with the shards, and the ring runs the steps whose only pairs are prefix
    pairs (a prefix query attends later keys, which a causal schedule alone would skip)."""
    cp = 2 if strategy == "all_to_all" else 4  # all_to_all splits the 2 key/value heads
    lay = prefix_layout(False)
    q_seg, _ = sides(lay)
    q, k, v, w = (jnp.asarray(a) for a in layout_inputs(lay, seed=5)[:4])
    plan = thdkit.plan_attention(
        q_seg, mask_type="causal", max_segments_per_seq=S, implementation="reference"
    )

    def one_device(q, k, v):
        return jnp.sum(thdkit.attention(q, k, v, scale=SCALE, plan=plan) * w)

    mesh = Mesh(np.array(jax.devices()[:cp]), ("cp",))
    if order == "striped":
        forward = lambda x, axis=-1: thdkit.reorder.striped(x, cp=cp, axis=axis)  # noqa: E731
        back = lambda x: thdkit.reorder.unstriped(x, cp=cp, axis=1)  # noqa: E731
    else:
        forward, back = (lambda x, axis=-1: x), (lambda x: x)
    shards = jax.tree.map(forward, q_seg)

    def parallel(q, k, v):
        out = thdkit.context_parallel_attention(
            *(forward(x, axis=1) for x in (q, k, v)), q_segments=shards, mask_type="causal",
            max_segments_per_seq=S, mesh=mesh, axis_name="cp", strategy=strategy, scale=SCALE,
        )  # fmt: skip
        return jnp.sum(back(out) * w)

    want = jax.value_and_grad(one_device, (0, 1, 2))(q, k, v)
    got = jax.value_and_grad(parallel, (0, 1, 2))(q, k, v)
    for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, x, atol=2e-5, rtol=2e-5)


def test_a_strategy_without_the_prefix_is_refused():
    """A strategy written outside that does not declare "prefix" never drops it silently."""
    lay = prefix_layout(False)
    q_seg, _ = sides(lay)
    q, k, v = (jnp.asarray(a) for a in layout_inputs(lay, seed=5)[:3])
    ring = thdkit.context_parallel.get("ring")
    mine = dataclasses.replace(ring, name="no_prefix", features=frozenset({"sinks"}))
    thdkit.context_parallel.register(mine)
    try:
        with pytest.raises(NotImplementedError, match=r"no_prefix.*prefix-LM"):
            thdkit.context_parallel_attention(
                q, k, v, q_segments=q_seg, mask_type="causal", max_segments_per_seq=S,
                mesh=Mesh(np.array(jax.devices()[:2]), ("cp",)), axis_name="cp",
                strategy="no_prefix",
            )  # fmt: skip
    finally:
        thdkit.context_parallel.unregister("no_prefix")
