"""Attention over packed (THD) rows, masked from segment ids and positions."""

from thdkit.kernels.api import AttentionPlan, Implementation, attention, plan_attention
from thdkit.kernels.pallas import pallas_attention
from thdkit.kernels.representable import is_representable
from thdkit.kernels.tiles import DEFAULT_BLOCK, TileRanges, default_block, tile_ranges

__all__ = [
    "DEFAULT_BLOCK",
    "AttentionPlan",
    "Implementation",
    "TileRanges",
    "attention",
    "default_block",
    "is_representable",
    "pallas_attention",
    "plan_attention",
    "tile_ranges",
]
