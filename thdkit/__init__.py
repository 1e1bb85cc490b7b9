"""thdkit: exact O(T) varlen-attention metadata, and attention, for packed sequences in JAX."""

from thdkit import reorder
from thdkit.context_parallel import context_parallel_attention
from thdkit.context_parallel import ring_attention
from thdkit.context_parallel import ring_schedule
from thdkit.kernels import AttentionPlan
from thdkit.kernels import attention
from thdkit.kernels import is_representable
from thdkit.kernels import plan_attention
from thdkit.layout import LayoutError
from thdkit.layout import RowChecks
from thdkit.layout import check_layout
from thdkit.layout import layout_error_codes
from thdkit.layout import validate_layout
from thdkit.limits import MAX_POSITION
from thdkit.limits import MAX_SEGMENTS
from thdkit.limits import MAX_SEQ_LEN
from thdkit.mask_types import MaskType
from thdkit.seqmeta import FlatSeqMeta
from thdkit.seqmeta import SeqMeta
from thdkit.metadata import seqlens_and_offsets
from thdkit.segments import Segments
from thdkit.segments import run_lengths
from thdkit.dot_product import dot_product_attention
from thdkit.dot_product import dot_product_attention_weights
from thdkit.varlen import Unpadded
from thdkit.varlen import pad
from thdkit.varlen import unpad

__all__ = [
    "MAX_POSITION",
    "MAX_SEGMENTS",
    "MAX_SEQ_LEN",
    "AttentionPlan",
    "FlatSeqMeta",
    "LayoutError",
    "MaskType",
    "RowChecks",
    "Segments",
    "SeqMeta",
    "Unpadded",
    "attention",
    "check_layout",
    "context_parallel_attention",
    "dot_product_attention",
    "dot_product_attention_weights",
    "is_representable",
    "layout_error_codes",
    "pad",
    "plan_attention",
    "reorder",
    "ring_attention",
    "ring_schedule",
    "run_lengths",
    "seqlens_and_offsets",
    "unpad",
    "validate_layout",
]

__version__ = "0.1.0"
