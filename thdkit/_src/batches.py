"""The context-parallel reorder of a whole batch (host side, NumPy): every per-token array alike.

Axis legend: B batch, T row length, cp = ranks. What :func:`thdkit.data.reorder_batch` (and
:func:`thdkit.data.pack` at ``cp > 1``) runs; it needs no input-pipeline library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import numpy as np

from thdkit._src.balance import balance
from thdkit._src.limits import check_int
from thdkit._src.reorder import dual_chunk_swap, permute, striped
from thdkit._src.segments import Segments

__all__ = ["REORDERS", "Reorder", "reorder_batch"]

Reorder = Literal["striped", "dual_chunk_swap", "balanced"]
REORDERS = ("striped", "dual_chunk_swap", "balanced")
"""The reorders :func:`reorder_batch` applies."""


def _layout(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The batch's ids and positions in document order: its :class:`Segments` value, else the
    first ``*_segment_ids`` with its ``*_positions``."""
    for value in batch.values():
        if isinstance(value, Segments):
            return np.asarray(value.ids), np.asarray(value.positions)
    for name, value in batch.items():
        if name.endswith("_segment_ids") and name[: -len("_segment_ids")] + "_positions" in batch:
            return np.asarray(value), np.asarray(batch[name[: -len("_segment_ids")] + "_positions"])
    raise ValueError(
        "reorder='balanced' reads the batch's layout: give it a thdkit.Segments value or a "
        "'<feature>_segment_ids' array with its '<feature>_positions'"
    )


def reorder_batch(
    batch: Mapping[str, np.ndarray | Segments],
    *,
    cp: int,
    reorder: Reorder = "striped",
    stripe_size: int = 1,
) -> dict[str, np.ndarray | Segments]:
    """Applies the context-parallel reorder to every per-token array of a batch (host side).

    Every value's last axis is the sequence axis (tokens, segment ids, positions, labels, loss
    weights alike), so all of them stay aligned; a :class:`thdkit.Segments` value (``pack``'s
    ``batch["segments"]``) is reordered field by field, its lengths (and prefix lengths) staying
    the whole documents'. The output comes back from :func:`thdkit.context_parallel_attention`
    in the same order; a token-wise loss over reordered labels needs no inverse
    (:func:`thdkit.reorder.unstriped` restores the order otherwise).

    ``"balanced"`` computes a permutation per row from the batch's layout
    (:func:`thdkit.reorder.balance` with a causal work model: whole documents where they fit,
    long ones spread; docs/context-parallel.md, "The balanced reorder"): the values must be
    ``[B, ..., T]`` with the rows first, the documents are renumbered (every ``*_segment_ids``
    value and the Segments' ids get the new numbers), and the permutation is returned under
    ``"order"`` (int32[B, T]) so that :func:`thdkit.reorder.unpermute` restores any output.

    Args:
        batch: mapping of name to NumPy array [..., T] or :class:`thdkit.Segments`.
        cp: the number of context-parallel ranks, an int >= 1.
        reorder: ``"striped"`` (causal masks, packed rows), ``"dual_chunk_swap"`` or
            ``"balanced"``.
        stripe_size: tokens per stripe (``"striped"`` only).

    Returns:
        A new dict with the same keys, each array (each Segments field) reordered along its last
        axis; with ``"balanced"``, also ``"order"``.

    Raises:
        TypeError: ``batch`` not a mapping, a non-int ``cp`` or ``stripe_size``, a non-str
            ``reorder``.
        ValueError: an unknown ``reorder``, or a sequence length that the reorder cannot split
            (T must be a multiple of ``cp * stripe_size``, of ``2 * cp``, or of ``cp``), naming
            the key; ``"balanced"`` on a batch without a layout, or with an ``"order"`` key.

    Example:
        >>> batch = {"inputs_segment_ids": np.array([[1, 1, 1, 1, 2, 2, 0, 0]])}
        >>> reorder_batch(batch, cp=2)["inputs_segment_ids"]
        array([[1, 1, 2, 0, 1, 1, 2, 0]])
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of name to array, got {type(batch).__name__}")
    cp = check_int(cp, "cp", low=1)
    stripe_size = check_int(stripe_size, "stripe_size", low=1)
    choices = ", ".join(map(repr, REORDERS))
    if not isinstance(reorder, str):
        raise TypeError(f"reorder must be one of {choices}, got {type(reorder).__name__}")
    if reorder not in REORDERS:
        raise ValueError(f"reorder must be one of {choices}, got {reorder!r}")
    out: dict[str, np.ndarray | Segments] = {}
    relabelled = None
    if reorder == "balanced":
        if "order" in batch:
            raise ValueError("reorder='balanced' returns the permutation under 'order': rename it")
        result = balance(*_layout(batch), cp=cp)
        out["order"], relabelled = result.order, result.segment_ids
        move: Callable[[Any], np.ndarray] = lambda a: permute(  # noqa: E731
            np.asarray(a), result.order, axis=np.ndim(a) - 1
        )
    elif reorder == "striped":
        move = lambda a: striped(np.asarray(a), cp=cp, stripe_size=stripe_size)  # noqa: E731
    else:
        move = lambda a: dual_chunk_swap(np.asarray(a), cp=cp)  # noqa: E731
    for name, value in batch.items():
        try:
            if isinstance(value, Segments):
                value = jax.tree.map(move, value)
                if relabelled is not None:
                    value = dataclasses.replace(value, ids=relabelled)
                out[name] = value
            elif relabelled is not None and name.endswith("_segment_ids"):
                out[name] = relabelled.astype(np.asarray(value).dtype)
            else:
                out[name] = move(value)
        except ValueError as error:
            raise ValueError(f"batch[{name!r}]: {error}") from None
    return out
