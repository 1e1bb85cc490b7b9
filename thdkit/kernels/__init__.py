"""Attention implementations over packed (THD) rows, their protocol, registry and plan.

``thdkit.attention`` is the function; this subpackage holds what it is made of.
"""

# ruff: noqa: I001  (one re-export per line, as in thdkit/__init__.py)

from thdkit.kernels.api import attention
from thdkit.kernels.api import plan_attention
from thdkit.kernels.base import Implementation
from thdkit.kernels.base import default_order
from thdkit.kernels.base import names
from thdkit.kernels.base import register
from thdkit.kernels.base import unregister
from thdkit.kernels.config import AttentionConfig
from thdkit.kernels.pallas import pallas_attention
from thdkit.kernels.partial import attention_partial
from thdkit.kernels.partial import check_partial_implementation
from thdkit.kernels.partial import partial_implementations
from thdkit.kernels.plan import AttentionPlan
from thdkit.kernels.representable import is_representable
from thdkit.kernels.tiles import DEFAULT_BLOCK
from thdkit.kernels.tiles import TileRanges
from thdkit.kernels.tiles import default_block
from thdkit.kernels.tiles import tile_ranges

__all__ = [
    "DEFAULT_BLOCK",
    "AttentionConfig",
    "AttentionPlan",
    "Implementation",
    "TileRanges",
    "attention",
    "attention_partial",
    "check_partial_implementation",
    "default_block",
    "default_order",
    "is_representable",
    "names",
    "pallas_attention",
    "partial_implementations",
    "plan_attention",
    "register",
    "tile_ranges",
    "unregister",
]
