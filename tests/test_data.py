"""thdkit.data: Grain packing in thdkit's layout, batching, and the host-side reorder."""

from __future__ import annotations

import grain
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import thdkit
from thdkit import reorder
from thdkit._src.validate.rules import validate_layout
from thdkit.data import SEGMENTS, pack, reorder_batch

T, BATCH = 16, 2


def _documents(lengths: list[int]) -> list[dict[str, np.ndarray]]:
    """Document k holds tokens 100k + 1, 100k + 2, ... (so every token names its document)."""
    return [
        {"inputs": 100 * k + np.arange(1, n + 1), "targets": -(100 * k + np.arange(1, n + 1))}
        for k, n in enumerate(lengths)
    ]


def _unpack(batches) -> list[np.ndarray]:
    """The documents of the batches, in row order then id order."""
    docs = []
    for batch in batches:
        for ids, tokens in zip(batch["inputs_segment_ids"], batch["inputs"], strict=True):
            docs += [tokens[ids == s] for s in np.unique(ids[ids > 0])]
    return docs


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 24), min_size=1, max_size=20),
    segments=st.integers(1, 4),
    algorithm=st.sampled_from(["first_fit", "best_fit"]),
)
def test_packed_rows_follow_the_layout_and_keep_every_document(lengths, segments, algorithm):
    docs = _documents(lengths)
    batches = list(
        pack(
            grain.MapDataset.source(docs),
            seq_len=T,
            max_segments_per_seq=segments,
            batch_size=BATCH,
            features=("inputs", "targets"),
            algorithm=algorithm,
            drop_remainder=False,
        )
    )
    for batch in batches:
        ids, pos = batch["inputs_segment_ids"], batch["inputs_positions"]
        assert ids.shape[1:] == (T,) and ids.dtype == np.int32
        validate_layout(ids, pos, max_segments_per_seq=segments, mask_type="padding_causal")
        # batch["segments"] is the batch's layout as Segments.from_ids builds it, in NumPy.
        layout = batch[SEGMENTS]
        assert isinstance(layout, thdkit.Segments) and isinstance(layout.ids, np.ndarray)
        expected = thdkit.Segments.from_ids(ids, pos)
        for got, want in zip(jax.tree.leaves(layout), jax.tree.leaves(expected), strict=True):
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(batch["inputs"][ids == 0], 0)
        np.testing.assert_array_equal(batch["targets"], np.where(ids > 0, -batch["inputs"], 0))
        for row_ids, row_pos in zip(ids, pos, strict=True):
            for s in np.unique(row_ids[row_ids > 0]):
                np.testing.assert_array_equal(
                    row_pos[row_ids == s], np.arange((row_ids == s).sum())
                )
    # Every non-empty document arrives once, truncated to T, in its own tokens.
    expected = sorted(tuple(d["inputs"][:T]) for d in docs if d["inputs"].size)
    assert sorted(tuple(d) for d in _unpack(batches)) == expected


def test_one_document_per_row_is_the_padded_baseline():
    docs = _documents([5, 3, 16, 2])
    (batch,) = pack(grain.MapDataset.source(docs), seq_len=T, max_segments_per_seq=1, batch_size=4)
    assert batch["inputs_segment_ids"].max(axis=1).tolist() == [1, 1, 1, 1]
    assert (batch["inputs_segment_ids"] > 0).sum(axis=1).tolist() == [5, 3, 16, 2]


@pytest.mark.parametrize(
    ("kind", "stripe"), [("striped", 1), ("striped", 2), ("dual_chunk_swap", 1)]
)
def test_context_parallel_batches_are_the_reordered_plain_batches(kind, stripe):
    docs = _documents([7, 3, 9, 12, 1, 5, 6, 4, 11])
    options = dict(seq_len=T, max_segments_per_seq=4, batch_size=BATCH, features=("inputs",))
    plain = list(pack(grain.MapDataset.source(docs), **options))
    cp = list(
        pack(grain.MapDataset.source(docs), cp=4 // stripe, reorder=kind, stripe_size=stripe,
             **options)
    )  # fmt: skip
    assert len(cp) == len(plain) > 0
    undo = {
        "striped": lambda a: reorder.unstriped(a, cp=4 // stripe, stripe_size=stripe),
        "dual_chunk_swap": lambda a: reorder.undo_dual_chunk_swap(a, cp=4 // stripe),
    }[kind]
    for a, b in zip(plain, cp, strict=True):
        assert a.keys() == b.keys()
        for key in a:  # arrays and the Segments' fields alike
            for got, want in zip(jax.tree.leaves(b[key]), jax.tree.leaves(a[key]), strict=True):
                np.testing.assert_array_equal(undo(got), want)
        # The reordered rows are valid shard by shard, and the Segments keep whole lengths.
        shards = b[SEGMENTS].ids.reshape(BATCH, 4 // stripe, -1)
        shard_pos = b[SEGMENTS].positions.reshape(BATCH, 4 // stripe, -1)
        validate_layout(shards, shard_pos, max_segments_per_seq=4, mask_type="padding_causal")
        np.testing.assert_array_equal(undo(b[SEGMENTS].lengths), a[SEGMENTS].lengths)


def test_striped_batches_go_to_context_parallel_attention_as_they_are():
    """pack(cp=2)'s batch["segments"], sharded with the batch, is what
    context_parallel_attention takes: the same attention as the plain batch on one device."""
    docs = _documents([7, 3, 9, 12, 1, 5, 6, 4, 11])
    options = dict(seq_len=T, max_segments_per_seq=4, batch_size=BATCH, features=("inputs",))
    plain = next(iter(pack(grain.MapDataset.source(docs), **options)))
    mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
    batch = next(iter(pack(grain.MapDataset.source(docs), cp=2, **options)))
    batch = jax.device_put(batch, NamedSharding(mesh, P(None, "cp")))
    qkv = jax.random.normal(jax.random.key(0), (3, BATCH, T, 1, 4))
    expected = thdkit.attention(
        *qkv,
        plan=thdkit.plan_attention(
            plain[SEGMENTS], mask_type="padding_causal", max_segments_per_seq=4
        ),
    )
    q, k, v = (jax.device_put(reorder.striped(x, cp=2, axis=1), batch[SEGMENTS].ids.sharding)
               for x in qkv)  # fmt: skip
    out = thdkit.context_parallel_attention(
        q, k, v, q_segments=batch[SEGMENTS], max_segments_per_seq=4, mesh=mesh, axis_name="cp"
    )
    np.testing.assert_allclose(reorder.unstriped(out, cp=2, axis=1), expected, atol=1e-5)
    # The reordered ids are not a whole-row layout: from_ids refuses them (rule 3 or 4).
    with pytest.raises(ValueError, match=r"row 0, token \d+: id \d"):
        thdkit.Segments.from_ids(
            np.asarray(batch["inputs_segment_ids"]), np.asarray(batch["inputs_positions"])
        )


def _leaky(packer: type, *, extra: int = 1):
    """A Grain packer that ignores the cap on documents a row by ``extra``."""

    def make(*args, max_sequences_per_bin: int, **kwargs):
        return packer(*args, max_sequences_per_bin=max_sequences_per_bin + extra, **kwargs)

    return make


def test_batches_are_checked_on_the_host_an_id_above_s_raises(monkeypatch):
    """A packer that breaks S is caught before the batch leaves the pipeline, naming the key, the
    row and the token (under jit the id would pass unnoticed)."""
    real = grain.experimental.FirstFitPackIterDataset
    monkeypatch.setattr(grain.experimental, "FirstFitPackIterDataset", _leaky(real))
    docs = grain.MapDataset.source(_documents([2, 2, 2, 2]))
    rows = pack(docs, seq_len=T, max_segments_per_seq=2, batch_size=1)
    with pytest.raises(
        ValueError,
        match=r"pack: .*inputs_segment_ids row 0, token 4: id 3 exceeds max_segments_per_seq=2",
    ):
        next(iter(rows))


def test_batches_are_checked_on_the_host_features_must_agree(monkeypatch):
    real = grain.experimental.FirstFitPackIterDataset

    def shifted(*args, **kwargs):  # targets packed with a layout of their own
        def corrupt(row):
            return row | {"targets_positions": row["targets_positions"] + 1}

        return real(*args, **kwargs).map(corrupt)

    monkeypatch.setattr(grain.experimental, "FirstFitPackIterDataset", shifted)
    rows = pack(grain.MapDataset.source(_documents([3])), seq_len=T, max_segments_per_seq=2,
                batch_size=1, features=("inputs", "targets"))  # fmt: skip
    with pytest.raises(ValueError, match=r"targets_positions row 0, token 0: 1 differs from"):
        next(iter(rows))


def test_reorder_batch_reorders_every_array_alike():
    layout = thdkit.Segments(*(k * np.arange(8)[None] for k in (1, 2, 3)))
    batch = {"a": np.arange(8)[None], "b": 10 * np.arange(8)[None], "layout": layout}
    out = reorder_batch(batch, cp=2, stripe_size=2)
    np.testing.assert_array_equal(out["a"], [[0, 1, 4, 5, 2, 3, 6, 7]])
    np.testing.assert_array_equal(out["b"], 10 * out["a"])
    assert isinstance(out["layout"], thdkit.Segments)
    for k, field in enumerate(jax.tree.leaves(out["layout"]), start=1):
        np.testing.assert_array_equal(field, k * out["a"])
    with pytest.raises(ValueError, match=r"batch\['a'\]"):
        reorder_batch({"a": np.arange(6)}, cp=4)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(seq_len=0), ValueError, "seq_len must be >= 1"),
        (dict(seq_len=16.0), TypeError, "seq_len must be an int"),
        (dict(max_segments_per_seq=True), TypeError, "max_segments_per_seq must be an int"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(features=()), ValueError, "features"),
        (dict(algorithm="next_fit"), ValueError, "algorithm"),
        (dict(reorder="zigzag", cp=2), ValueError, "reorder"),
        (dict(cp=3), ValueError, "seq_len=16 must be a multiple of 3"),
        (dict(cp=4, stripe_size=8), ValueError, "multiple of 32"),
        (dict(cp=32, reorder="dual_chunk_swap"), ValueError, "multiple of 64"),
    ],
)
def test_option_errors_name_the_option(options, error, match):
    base = dict(seq_len=T, max_segments_per_seq=2, batch_size=BATCH)
    with pytest.raises(error, match=match):
        pack(grain.MapDataset.source(_documents([3])), **(base | options))


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        # features: a str where a sequence of names is expected, or names that cannot be packed
        (dict(features="inputs"), TypeError, r"features must be a sequence of feature names"),
        (dict(features=b"inputs"), TypeError, r"features must be a sequence of feature names"),
        (dict(features=3), TypeError, r"features must be a sequence of feature names .* got int"),
        (dict(features={"inputs": 1}), TypeError, r"features must be a sequence .* got dict"),
        (dict(features=("inputs", 3)), TypeError, r"features must hold str names, got 3"),
        (dict(features=[None]), TypeError, r"features must hold str names, got None"),
        (dict(features=("",)), ValueError, r"features must hold non-empty names"),
        (dict(features=("inputs", "inputs")), ValueError, r"features must name each feature once"),
        (
            dict(features=("inputs", "inputs_positions")),
            ValueError,
            r"features \['inputs_positions'\] would collide",
        ),
        (dict(features=("inputs", "targets")), ValueError, r"features names \['targets'\], which"),
        (dict(features=["inputz"]), ValueError, r"features names \['inputz'\], which the docu"),
        (dict(features=("segments",)), ValueError, r"features must not name 'segments'"),
        (dict(features=("segments",)), ValueError, r"features must not name 'segments'"),
        (dict(features=("segments",)), ValueError, r"features must not name 'segments'"),
        # the other arguments
        (dict(seq_len=2**30 + 1), ValueError, r"seq_len must be >= 1 and <= 1073741824"),
        (dict(max_segments_per_seq=2**30), ValueError, "max_segments_per_seq must be >= 1 and <="),
        (dict(batch_size="2"), TypeError, "batch_size must be an int, got str"),
        (dict(num_packing_bins=0), ValueError, "num_packing_bins must be >= 1"),
        (dict(num_packing_bins=2.5), TypeError, "num_packing_bins must be an int"),
        (dict(algorithm=["first_fit"]), TypeError, "algorithm must be one of .* got list"),
        (dict(algorithm="next_fit"), ValueError, "algorithm must be one of 'first_fit', 'best"),
        (dict(reorder=None, cp=2), TypeError, "reorder must be one of .* got NoneType"),
        (dict(shuffle_bins="yes"), TypeError, "shuffle_bins must be a bool, got str"),
        (dict(shuffle_bins=1), TypeError, "shuffle_bins must be a bool, got int"),
        (dict(drop_remainder=None), TypeError, "drop_remainder must be a bool"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
        (dict(seed=0.5), TypeError, "seed must be an int"),
        (dict(cp=True), TypeError, "cp must be an int, got bool"),
        (dict(stripe_size=0), ValueError, "stripe_size must be >= 1"),
    ],
)
def test_arguments_are_checked_at_construction(options, error, match):
    base = dict(seq_len=T, max_segments_per_seq=2, batch_size=BATCH)
    with pytest.raises(error, match=match):
        pack(grain.MapDataset.source([{"inputs": np.arange(3)}]), **(base | options))


@pytest.mark.parametrize("dataset", [[{"inputs": np.arange(3)}], None, "docs", np.arange(3)])
def test_the_dataset_must_be_a_grain_dataset(dataset):
    with pytest.raises(TypeError, match=r"dataset must be a grain\.MapDataset or grain\.IterData"):
        pack(dataset, seq_len=T, max_segments_per_seq=2, batch_size=1)


def test_a_str_feature_name_would_have_packed_its_letters():
    """The defect: ``features="inputs"`` read as the features 'i', 'n', 'p', ... and failed only
    at the first document; a one-name tuple packs."""
    docs = grain.MapDataset.source([{"inputs": np.arange(3)}])
    with pytest.raises(TypeError, match=r"such as \('inputs',\)"):
        pack(docs, seq_len=T, max_segments_per_seq=2, batch_size=1, features="inputs")
    (batch,) = pack(docs, seq_len=T, max_segments_per_seq=2, batch_size=1, features=["inputs"])
    assert batch["inputs"].shape == (1, T)


def test_empty_and_filtered_map_datasets_are_not_read_at_construction():
    empty = pack(grain.MapDataset.source([]), seq_len=T, max_segments_per_seq=2, batch_size=1)
    assert list(empty) == []
    filtered = grain.MapDataset.source([{"inputs": np.arange(3)}]).filter(lambda d: False)
    assert list(pack(filtered, seq_len=T, max_segments_per_seq=2, batch_size=1)) == []


def test_reorder_batch_checks_its_arguments():
    batch = {"a": np.arange(8)[None]}
    with pytest.raises(TypeError, match="batch must be a mapping"):
        reorder_batch([np.arange(8)], cp=2)
    with pytest.raises(TypeError, match="reorder must be one of"):
        reorder_batch(batch, cp=2, reorder=1)
    with pytest.raises(ValueError, match="reorder must be one of"):
        reorder_batch(batch, cp=2, reorder="zigzag")
    with pytest.raises(TypeError, match="cp must be an int"):
        reorder_batch(batch, cp=2.0)


@pytest.mark.parametrize(
    ("docs", "match"),
    [
        ([np.arange(3)], "dict of features"),
        ([{"targets": np.arange(3)}], "lacks the features"),
        ([{"inputs": np.ones((2, 2))}], "1-D of one length"),
        ([{"inputs": np.arange(3), "targets": np.arange(4)}], "1-D of one length"),
        ([{"inputs": np.arange(3)}, {"targets": np.arange(3)}], "lacks the features"),
    ],
)
def test_malformed_documents_are_refused(docs, match):
    """What construction cannot see (an IterDataset, or a later document) fails at iteration."""
    features = ("inputs", "targets") if isinstance(docs[0], dict) and len(docs[0]) > 1 else None
    dataset = pack(
        grain.MapDataset.source(docs).to_iter_dataset(),
        seq_len=T,
        max_segments_per_seq=2,
        batch_size=len(docs),
        features=features or ("inputs",),
    )
    with pytest.raises(ValueError, match=match):
        next(iter(dataset))


def test_reorder_batch_balanced_keeps_every_array_aligned_and_returns_the_order():
    """The balanced reorder: one permutation per row applied to every array, the documents
    renumbered alike in the Segments and the ``*_segment_ids``, and ``"order"`` undoing it."""
    ids = np.array([[1] * 20 + [2] * 4 + [3] * 6 + [0] * 2, [1] * 32])
    pos = np.array([[*range(20), *range(4), *range(6), 0, 0], [*range(32)]])
    segments = thdkit.Segments(ids, pos, np.zeros_like(ids))
    tokens = 100 + np.arange(64).reshape(2, 32)
    batch = {"inputs": tokens, "inputs_segment_ids": ids, "inputs_positions": pos, "seg": segments}
    out = reorder_batch(batch, cp=4, reorder="balanced")
    order = out["order"]
    np.testing.assert_array_equal(thdkit.reorder.unpermute(out["inputs"], order), tokens)
    np.testing.assert_array_equal(out["inputs_positions"], out["seg"].positions)
    np.testing.assert_array_equal(out["inputs_segment_ids"], out["seg"].ids)
    moved = thdkit.reorder.permute(ids, order)
    for b in range(2):  # the same documents, new numbers
        pairs = {(int(o), int(n)) for o, n in zip(moved[b], out["seg"].ids[b], strict=True)}
        assert len({o for o, _ in pairs}) == len({n for _, n in pairs}) == len(pairs)
    for rank in range(4):
        shard = slice(8 * rank, 8 * rank + 8)
        thdkit.validate_layout(
            np.ascontiguousarray(out["seg"].ids[:, shard]),
            np.ascontiguousarray(out["seg"].positions[:, shard]),
            max_segments_per_seq=None,
        )
    with pytest.raises(ValueError, match="'order'"):
        reorder_batch({**batch, "order": ids}, cp=4, reorder="balanced")
    with pytest.raises(ValueError, match="layout"):
        reorder_batch({"inputs": tokens}, cp=4, reorder="balanced")


def test_pack_balanced_feeds_the_ring():
    """pack(cp=4, reorder="balanced") yields batches whose Segments the ring takes as they are:
    its output, unpermuted, equals single-device attention on the unreordered batch."""
    docs = [{"inputs": np.arange(1, n + 1)} for n in (20, 5, 9, 30, 3, 7)]
    kwargs = dict(seq_len=32, max_segments_per_seq=4, batch_size=2)
    plain = next(iter(pack(grain.MapDataset.source(docs), **kwargs)))
    packed = next(iter(pack(grain.MapDataset.source(docs), cp=4, reorder="balanced", **kwargs)))
    order = packed["order"]
    np.testing.assert_array_equal(
        thdkit.reorder.unpermute(packed["inputs"], order), plain["inputs"]
    )
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 32, 2, 8)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("cp",))
    got = thdkit.context_parallel_attention(
        *(thdkit.reorder.permute(q, order) for _ in range(3)), q_segments=packed[SEGMENTS],
        max_segments_per_seq=4, mesh=mesh, axis_name="cp",
    )  # fmt: skip
    want = thdkit.attention(q, q, q, plan=thdkit.plan_attention(
        plain[SEGMENTS], mask_type="padding_causal", max_segments_per_seq=4
    ))  # fmt: skip
    np.testing.assert_allclose(thdkit.reorder.unpermute(got, order), want, atol=1e-5)
