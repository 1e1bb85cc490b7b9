"""thdkit: exact O(T) varlen-attention metadata for packed sequences in JAX."""

from thdkit import synth
from thdkit.layout import LayoutError
from thdkit.layout import LayoutErrors
from thdkit.layout import check_layout
from thdkit.layout import layout_error_codes
from thdkit.layout import run_lengths
from thdkit.layout import validate_layout
from thdkit.masks import MaskType
from thdkit.metadata import FlatSeqMeta
from thdkit.metadata import SeqMeta
from thdkit.metadata import seqlens_and_offsets

__all__ = [
    "FlatSeqMeta",
    "LayoutError",
    "LayoutErrors",
    "MaskType",
    "SeqMeta",
    "check_layout",
    "layout_error_codes",
    "run_lengths",
    "seqlens_and_offsets",
    "synth",
    "validate_layout",
]

__version__ = "0.1.0"
