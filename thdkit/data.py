"""Grain input pipelines for packed rows: packing, batching and the context-parallel reorder.

Axis legend: B batch (``batch_size``), T row length (``seq_len``), S = ``max_segments_per_seq``.

Grain's packers (``grain.experimental.FirstFitPackIterDataset``, ``BestFitPackIterDataset``) emit
for each packed feature ``f`` the tokens ``f``, ``f_segment_ids`` (1..n for the documents of the
row, 0 for padding) and ``f_positions`` (each token's position inside its document, 0 on
padding): thdkit's layout convention as it is. :func:`pack` adds what a training loop needs
around them:

- ``max_sequences_per_bin`` tied to ``max_segments_per_seq``, so no row holds an id above S;
- documents longer than T truncated to T (Grain refuses them), empty ones dropped;
- batching to ``[B, T]``, and every batch checked on the host (NumPy, nothing compiled) against
  the layout rules and S before it leaves the pipeline;
- ``batch["segments"]``: the batch's :class:`thdkit.Segments` (ids, positions, document lengths),
  ready for :func:`thdkit.plan_attention`, :class:`thdkit.flax.PackedSelfAttention` and
  :func:`thdkit.context_parallel_attention`;
- for context parallelism, the load-balancing reorder (:func:`thdkit.reorder.striped`,
  :func:`thdkit.reorder.dual_chunk_swap` or the per-row :func:`thdkit.reorder.balance`) applied
  on the host, in NumPy, to every per-token
  array of the batch and to ``batch["segments"]``, so the device never reorders: shard the
  sequence axis over the mesh and pass ``batch["segments"]`` to
  :func:`thdkit.context_parallel_attention` (``q_segments=``) or to the layer with a mesh. A
  reordered row is not a valid layout as a whole row (each document appears once per shard), so
  ``thdkit.Segments.from_ids`` refuses the reordered ``*_segment_ids``; ``batch["segments"]``
  needs no rebuilding.

Install with ``pip install "thdkit[flax]"`` (it brings ``grain``); the rest of thdkit never
imports this module.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import grain
import numpy as np

from thdkit._src.batches import REORDERS, Reorder, reorder_batch
from thdkit._src.limits import MAX_SEGMENTS, MAX_SEQ_LEN
from thdkit._src.segments import Segments
from thdkit._src.validate.rules import validate_layout

__all__ = ["SEGMENTS", "pack", "reorder_batch"]

Algorithm = Literal["first_fit", "best_fit"]


_SUFFIXES = ("_segment_ids", "_positions")  # What Grain's packers add to each feature's name.

SEGMENTS = "segments"
"""The key of a batch's :class:`thdkit.Segments` in what :func:`pack` yields."""


def _positive_int(value: Any, name: str, *, high: int | None = None, low: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < low or (high is not None and value > high):
        bound = "" if high is None else f" and <= {high}"
        raise ValueError(f"{name} must be >= {low}{bound}, got {value}")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be one of {', '.join(map(repr, choices))}, got {type(value).__name__}"
        )
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _feature_names(features: Any) -> tuple[str, ...]:
    """``features`` as a tuple of distinct names whose packed keys do not collide."""
    if isinstance(features, (str, bytes)):
        raise TypeError(
            f"features must be a sequence of feature names such as ({features!r},), got the "
            f"{type(features).__name__} {features!r}"
        )
    if isinstance(features, Mapping) or not isinstance(features, Sequence):
        raise TypeError(
            "features must be a sequence of feature names such as ('inputs', 'targets'), got "
            f"{type(features).__name__}"
        )
    names = tuple(features)
    if not names:
        raise ValueError("features must name at least one feature, got none")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"features must hold str names, got {name!r} ({type(name).__name__}) in {names!r}"
            )
        if not name:
            raise ValueError(f"features must hold non-empty names, got {names!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"features must name each feature once, got {repeated} more than once")
    if SEGMENTS in names:
        raise ValueError(
            f"features must not name {SEGMENTS!r}: pack yields the batch's thdkit.Segments under "
            "that key; rename the feature"
        )
    clashes = [n + suffix for n in names for suffix in _SUFFIXES if n + suffix in names]
    if clashes:
        raise ValueError(
            f"features {clashes} would collide with the packed keys of another feature "
            f"(pack adds {', '.join(_SUFFIXES)} to each name)"
        )
    return names


def _first_document(dataset: grain.MapDataset) -> Any:
    """The first element of a map dataset (random access: nothing else is read), or None."""
    try:
        if len(dataset) == 0:
            return None
    except (TypeError, OverflowError):  # no length: an infinite dataset still has a first one
        pass
    return dataset[0]


def _first_difference(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(row, token) of the first element where two [B, T] arrays differ."""
    row, token = np.argwhere(a != b)[0]
    return int(row), int(token)


def _document_lengths(ids: np.ndarray) -> np.ndarray:
    """Each token's run length (its document's length: one run per document), 0 on padding;
    int32[B, T] from valid int32[B, T] ids, in O(B·T)."""
    starts = np.ones(ids.shape, bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = np.cumsum(starts.reshape(-1)) - 1  # Every row starts a run: runs never span rows.
    lengths = np.bincount(run)[run].reshape(ids.shape).astype(np.int32)
    return np.where(ids > 0, lengths, 0).astype(np.int32)


def _batch_segments(
    batch: Mapping[str, np.ndarray],
    *,
    features: Sequence[str],
    max_segments_per_seq: int,
    prefix_feature: str | None = None,
) -> Segments:
    """The Segments of a packed batch (document order), after checking it on the host: every
    feature's ids and positions keep the layout rules (ids <= S, one run per document, ids
    increasing, positions increasing inside each document) and agree across the features; with
    ``prefix_feature``, its nonzero tokens mark each document's prefix (its first tokens)."""
    first = features[0]
    ids, pos = batch[first + "_segment_ids"], batch[first + "_positions"]
    try:
        validate_layout(
            ids,
            pos,
            max_segments_per_seq=max_segments_per_seq,
            mask_type="padding_causal",
            name=first + "_segment_ids",
        )
    except ValueError as error:
        raise ValueError(
            f"pack: the packer emitted a batch that breaks the layout rules: {error}"
        ) from None
    for feature in features[1:]:
        for suffix in _SUFFIXES:
            mine, theirs = batch[feature + suffix], batch[first + suffix]
            if not np.array_equal(mine, theirs):
                row, token = _first_difference(mine, theirs)
                raise ValueError(
                    f"pack: {feature}{suffix} row {row}, token {token}: {mine[row, token]} "
                    f"differs from {first}{suffix}'s {theirs[row, token]}; every feature of a "
                    "document must have the same length"
                )
    ids, pos = np.asarray(ids, np.int32), np.asarray(pos, np.int32)
    segments = Segments(ids=ids, positions=pos, lengths=_document_lengths(ids))
    if prefix_feature is None:
        return segments
    try:
        return segments.with_prefix(np.asarray(batch[prefix_feature]) != 0, name=prefix_feature)
    except ValueError as error:
        raise ValueError(f"pack: prefix_feature {error}") from None


def pack(
    dataset: grain.IterDataset | grain.MapDataset,
    *,
    seq_len: int,
    max_segments_per_seq: int,
    batch_size: int,
    features: Sequence[str] = ("inputs",),
    prefix_feature: str | None = None,
    num_packing_bins: int | None = None,
    algorithm: Algorithm = "first_fit",
    shuffle_bins: bool = False,
    seed: int = 0,
    cp: int = 1,
    reorder: Reorder = "striped",
    stripe_size: int = 1,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """Packs documents into rows of T tokens with Grain, batches them, and reorders for the ring.

    Each element of ``dataset`` is one document: a dict holding, for every name in ``features``,
    a 1-D array of the same length (e.g. ``inputs`` and next-token ``targets``). Documents are
    truncated to ``seq_len`` tokens and empty ones are dropped; rows hold at most
    ``max_segments_per_seq`` documents (``max_segments_per_seq=1`` gives one document per row,
    padded: the baseline packing is measured against). Every batch is checked on the host before
    it is yielded (NumPy, nothing compiled): ids in ``[0, max_segments_per_seq]``, each document
    one run, ids increasing along the row, positions increasing inside each document, the same
    layout for every feature. Thdkit's own pipeline thus never hands the device a layout that
    jitted code could not check.

    ``batch["segments"]`` is what attention takes: plan it (``thdkit.plan_attention(
    batch["segments"], max_segments_per_seq=S, ...)`` or ``layer.plan``) at ``cp=1``, or pass it
    as it is, reordered with the tokens, to :func:`thdkit.context_parallel_attention`
    (``q_segments=``) or to :class:`thdkit.flax.PackedSelfAttention` with a mesh at ``cp > 1``.

    Args:
        dataset: a ``grain.IterDataset`` or ``grain.MapDataset`` of documents.
        seq_len: T, tokens per row (a multiple of ``cp * stripe_size``, or of ``2 * cp``).
        max_segments_per_seq: S, the most documents a row may hold (Grain's
            ``max_sequences_per_bin``); pass the same S to :func:`thdkit.plan_attention`.
        batch_size: B, rows per batch.
        features: the per-token features to pack (not ``"segments"``, the key of the layout).
        prefix_feature: None, or one of ``features`` whose nonzero tokens mark each document's
            prefix (its first tokens by position, e.g. a 0/1 mask over the prompt of a
            prefix-LM): ``batch["segments"]`` then carries ``prefix_lengths``, which the
            attention entry points read as prefix-LM masks (docs/semantics.md, "Prefix-LM
            masks"). A document whose marks are not its first tokens raises while iterating.
        num_packing_bins: rows packed at once (more bins, less padding); None means
            ``batch_size``.
        algorithm: ``"first_fit"`` (``FirstFitPackIterDataset``) or ``"best_fit"``
            (``BestFitPackIterDataset``).
        shuffle_bins: shuffle the rows of each packing round (Grain's option).
        seed: the seed of that shuffle.
        cp: context-parallel ranks; above 1 every value of a batch is reordered by
            :func:`reorder_batch` (host side, NumPy).
        reorder, stripe_size: the reorder (see :func:`reorder_batch`): ``"striped"``,
            ``"dual_chunk_swap"`` or ``"balanced"`` (a permutation per row from its documents,
            returned under ``"order"``; the documents renumbered).
        drop_remainder: drop a last, smaller batch.

    Returns:
        A ``grain.IterDataset`` of dicts: for each feature ``f``, ``f`` ([B, T], the feature's
        dtype; 0 on padding), ``f_segment_ids`` (int32[B, T]; 0 = padding, 1..n <= S documents)
        and ``f_positions`` (int32[B, T]; position inside the document, 0 on padding); and
        ``"segments"``, the batch's :class:`thdkit.Segments` (NumPy int32[B, T] ids, positions
        and document lengths, and prefix lengths with ``prefix_feature``). Every value is
        reordered along T when ``cp > 1`` (and ``"order"``, int32[B, T], added by
        ``reorder="balanced"``).

    Raises:
        TypeError: ``dataset`` not a Grain dataset; a non-int size or ``seed``; ``features`` a
            str (one name: pass ``("inputs",)``) or not a sequence of str; a non-str
            ``prefix_feature``; a non-bool
            ``shuffle_bins`` or ``drop_remainder``; a non-str ``algorithm`` or ``reorder``.
        ValueError: a size below 1, T above :data:`thdkit.MAX_SEQ_LEN`, S above
            :data:`thdkit.MAX_SEGMENTS`, a negative ``seed``, no features, a repeated feature,
            one named ``"segments"`` or one that collides with another's packed keys, a
            ``prefix_feature`` not among ``features``, an unknown
            ``algorithm`` or ``reorder``, T not divisible for the reorder, a
            ``grain.MapDataset`` whose first document lacks a feature (each names the
            parameter); while iterating, a document that is not a dict of 1-D arrays of equal
            lengths holding every feature (an ``IterDataset`` is read only then), or a packed
            batch that breaks the layout rules or whose prefix marks are not each document's
            first tokens (naming the key, the row and the token).

    Example:
        >>> docs = [{"inputs": np.arange(1, n + 1)} for n in (3, 2, 4, 1)]
        >>> rows = pack(grain.MapDataset.source(docs), seq_len=8, max_segments_per_seq=2,
        ...             batch_size=2)
        >>> batch = next(iter(rows))
        >>> batch["inputs_segment_ids"]
        array([[1, 1, 1, 2, 2, 0, 0, 0],
               [1, 1, 1, 1, 2, 0, 0, 0]], dtype=int32)
        >>> batch["inputs_positions"][1]
        array([0, 1, 2, 3, 0, 0, 0, 0], dtype=int32)
        >>> batch["segments"].lengths[1]
        array([4, 4, 4, 4, 1, 0, 0, 0], dtype=int32)
        >>> striped = next(iter(pack(grain.MapDataset.source(docs), seq_len=8,
        ...                          max_segments_per_seq=2, batch_size=2, cp=2)))
        >>> striped["segments"].ids[0]  # shard 0 holds tokens 0, 2, 4, 6; shard 1 the rest
        array([1, 1, 2, 0, 1, 2, 0, 0], dtype=int32)
    """
    if not isinstance(dataset, (grain.MapDataset, grain.IterDataset)):
        raise TypeError(
            f"dataset must be a grain.MapDataset or grain.IterDataset, got {type(dataset).__name__}"
        )
    seq_len = _positive_int(seq_len, "seq_len", high=MAX_SEQ_LEN)
    num_segments = _positive_int(max_segments_per_seq, "max_segments_per_seq", high=MAX_SEGMENTS)
    batch_size = _positive_int(batch_size, "batch_size")
    cp = _positive_int(cp, "cp")
    stripe_size = _positive_int(stripe_size, "stripe_size")
    bins = batch_size if num_packing_bins is None else num_packing_bins
    bins = _positive_int(bins, "num_packing_bins")
    features = _feature_names(features)
    if prefix_feature is not None:
        if not isinstance(prefix_feature, str):
            raise TypeError(
                f"prefix_feature must be a feature name or None, got "
                f"{type(prefix_feature).__name__}"
            )
        if prefix_feature not in features:
            raise ValueError(
                f"prefix_feature must be one of features {features}, got {prefix_feature!r}"
            )
    packers = {
        "first_fit": grain.experimental.FirstFitPackIterDataset,
        "best_fit": grain.experimental.BestFitPackIterDataset,
    }
    algorithm = _choice(algorithm, "algorithm", tuple(packers))
    reorder = _choice(reorder, "reorder", REORDERS)
    shuffle_bins = _flag(shuffle_bins, "shuffle_bins")
    seed = _positive_int(seed, "seed", low=0)
    drop_remainder = _flag(drop_remainder, "drop_remainder")
    if cp > 1:
        multiple = {"striped": cp * stripe_size, "dual_chunk_swap": 2 * cp}.get(reorder, cp)
        if seq_len % multiple:
            raise ValueError(
                f"seq_len={seq_len} must be a multiple of {multiple} for reorder={reorder!r} "
                f"with cp={cp}" + (f", stripe_size={stripe_size}" if reorder == "striped" else "")
            )
    if isinstance(dataset, grain.MapDataset):
        first = _first_document(dataset)
        if isinstance(first, Mapping):
            missing = [f for f in features if f not in first]
            if missing:
                raise ValueError(
                    f"features names {missing}, which the documents lack (the first holds "
                    f"{sorted(map(str, first))})"
                )

    def truncate(document: Any) -> dict[str, np.ndarray]:
        if not isinstance(document, Mapping):
            raise ValueError(f"each document must be a dict of features, got {type(document)}")
        missing = [f for f in features if f not in document]
        if missing:
            raise ValueError(f"a document lacks the features {missing}; it has {list(document)}")
        arrays = {f: np.asarray(document[f]) for f in features}
        lengths = {f: a.shape for f, a in arrays.items()}
        if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) > 1:
            raise ValueError(f"a document's features must be 1-D of one length, got {lengths}")
        return {f: a[:seq_len] for f, a in arrays.items()}

    if isinstance(dataset, grain.MapDataset):
        dataset = dataset.to_iter_dataset()
    documents = dataset.map(truncate).filter(lambda d: d[features[0]].shape[0] > 0)
    packed = packers[algorithm](
        documents,
        length_struct={f: seq_len for f in features},
        num_packing_bins=bins,
        shuffle_bins=shuffle_bins,
        seed=seed,
        max_sequences_per_bin=num_segments,
    )
    batches = packed.batch(batch_size, drop_remainder=drop_remainder)

    def finish(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray | Segments]:
        segments = _batch_segments(
            batch,
            features=features,
            max_segments_per_seq=num_segments,
            prefix_feature=prefix_feature,
        )
        batch = {**batch, SEGMENTS: segments}
        if cp == 1:
            return batch
        return reorder_batch(batch, cp=cp, reorder=reorder, stripe_size=stripe_size)

    return batches.map(finish)
