"""Context-parallel reorders of a row's tokens, their inverses, and ring-step views
(docs/context-parallel.md, "Which reorder to use").

A reorder permutes the sequence axis so that the contiguous shard ``r`` of length ``T / cp``
holds what rank ``r`` owns: :func:`striped` (blocks of ``stripe_size`` tokens dealt round-robin)
and :func:`dual_chunk_swap` (rank r holds chunks r and ``2 * cp - 1 - r``), each with its inverse;
:func:`shard` cuts rank r's shard and :func:`ring_step` the view of one ring step.
:func:`balance` computes a permutation per row from its documents (whole documents where they
fit, long ones spread; the work of each rank near the mean; one per side for cross-attention
rows) with the permuted layout;
:func:`permute` applies it to every per-token array and :func:`unpermute` undoes it.
"""

# ruff: noqa: I001  (one re-export per line, as in thdkit/__init__.py)

from thdkit._src.balance import Balanced
from thdkit._src.balance import balance
from thdkit._src.balance import token_work
from thdkit._src.reorder import dual_chunk_swap
from thdkit._src.reorder import permute
from thdkit._src.reorder import ring_step
from thdkit._src.reorder import shard
from thdkit._src.reorder import striped
from thdkit._src.reorder import undo_dual_chunk_swap
from thdkit._src.reorder import unpermute
from thdkit._src.reorder import unstriped

__all__ = [
    "Balanced",
    "balance",
    "dual_chunk_swap",
    "permute",
    "ring_step",
    "shard",
    "striped",
    "token_work",
    "undo_dual_chunk_swap",
    "unpermute",
    "unstriped",
]
