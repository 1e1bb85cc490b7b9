"""Context-parallel reorders of a row's tokens, their inverses, and ring-step views
(docs/context-parallel.md, "Which reorder to use").

A reorder permutes the sequence axis so that the contiguous shard ``r`` of length ``T / cp``
holds what rank ``r`` owns: :func:`striped` (blocks of ``stripe_size`` tokens dealt round-robin)
and :func:`dual_chunk_swap` (rank r holds chunks r and ``2 * cp - 1 - r``), each with its inverse;
:func:`shard` cuts rank r's shard and :func:`ring_step` the view of one ring step.
"""

# ruff: noqa: I001  (one re-export per line, as in thdkit/__init__.py)

from thdkit._src.reorder import dual_chunk_swap
from thdkit._src.reorder import ring_step
from thdkit._src.reorder import shard
from thdkit._src.reorder import striped
from thdkit._src.reorder import undo_dual_chunk_swap
from thdkit._src.reorder import unstriped

__all__ = [
    "dual_chunk_swap",
    "ring_step",
    "shard",
    "striped",
    "undo_dual_chunk_swap",
    "unstriped",
]
