"""Attention implementations over packed (THD) rows: the protocol for implementers, the registry
and the plan (docs/attention.md, "Adding an implementation").

``thdkit.attention`` is the function; this module is what a new implementation is written
against: subclass :class:`Implementation`, :func:`register` it, and every entry point
(``attention``, ``dot_product_attention``, the Flax layer and ``attention_fn``, context
parallelism, ``thdkit bench attention``) can run it by name.
"""

# ruff: noqa: I001  (one re-export per line, as in thdkit/__init__.py)

from thdkit._src.doors.keywords import attention
from thdkit._src.doors.keywords import plan_attention
from thdkit._src.kernels.base import Implementation
from thdkit._src.kernels.base import default_order
from thdkit._src.kernels.base import get
from thdkit._src.kernels.base import names
from thdkit._src.kernels.base import register
from thdkit._src.kernels.base import unregister
from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.kernels.pallas import pallas_attention
from thdkit._src.kernels.partial import attention_partial
from thdkit._src.kernels.partial import partial_implementations
from thdkit._src.kernels.plan import AttentionPlan
from thdkit._src.kernels.representable import is_representable
from thdkit._src.kernels.sinks import attach_sinks
from thdkit._src.kernels.tiles import DEFAULT_BLOCK
from thdkit._src.kernels.tiles import TileRanges
from thdkit._src.kernels.tiles import default_block
from thdkit._src.kernels.tiles import tile_ranges
from thdkit._src.masks import pair_mask
from thdkit._src.moved import deprecated_attribute

__all__ = [
    "DEFAULT_BLOCK",
    "AttentionConfig",
    "AttentionPlan",
    "Implementation",
    "TileRanges",
    "attach_sinks",
    "attention",
    "attention_partial",
    "default_block",
    "default_order",
    "get",
    "is_representable",
    "names",
    "pair_mask",
    "pallas_attention",
    "partial_implementations",
    "plan_attention",
    "register",
    "tile_ranges",
    "unregister",
]

__getattr__ = deprecated_attribute(
    __name__,
    {
        "check_partial_implementation": (
            "thdkit._src.kernels.partial",
            "attention_partial's own check",
        )
    },
)
