"""thdkit: exact O(T) varlen-attention metadata, and attention, for packed sequences in JAX.

The public API is what this module, :mod:`thdkit.kernels` (the implementation protocol),
:mod:`thdkit.context_parallel` (the strategy protocol), :mod:`thdkit.reorder`, :mod:`thdkit.flax`
and :mod:`thdkit.data` export; the code lives in the private ``thdkit._src``.
"""

from thdkit._src import moved
from thdkit import context_parallel  # noqa: F401  (thdkit.context_parallel after `import thdkit`)
from thdkit import kernels  # noqa: F401  (thdkit.kernels after `import thdkit`)
from thdkit import reorder
from thdkit._src.context_parallel.api import context_parallel_attention
from thdkit._src.context_parallel.api import ring_attention
from thdkit._src.context_parallel.schedule import ring_schedule
from thdkit._src.kernels.plan import AttentionPlan
from thdkit._src.doors.keywords import attention
from thdkit._src.kernels.representable import is_representable
from thdkit._src.doors.keywords import plan_attention
from thdkit._src.programs import cache_info
from thdkit._src.programs import max_programs
from thdkit._src.programs import set_max_programs
from thdkit._src.validate.rules import LayoutError
from thdkit._src.validate.rules import RowChecks
from thdkit._src.validate.rules import check_layout
from thdkit._src.validate.rules import layout_error_codes
from thdkit._src.validate.rules import validate_layout
from thdkit._src.limits import MAX_POSITION
from thdkit._src.limits import MAX_SEGMENTS
from thdkit._src.limits import MAX_SEQ_LEN
from thdkit._src.mask_types import MaskType
from thdkit._src.seqmeta import FlatSeqMeta
from thdkit._src.seqmeta import SeqMeta
from thdkit._src.metadata import seqlens_and_offsets
from thdkit._src.segments import Segments
from thdkit._src.segments import run_lengths
from thdkit._src.doors.jax_nn import dot_product_attention
from thdkit._src.doors.jax_nn import dot_product_attention_weights
from thdkit._src.doors.flash_attn import Unpadded
from thdkit._src.doors.flash_attn import pad
from thdkit._src.doors.flash_attn import unpad

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
    "cache_info",
    "check_layout",
    "context_parallel_attention",
    "dot_product_attention",
    "dot_product_attention_weights",
    "is_representable",
    "layout_error_codes",
    "max_programs",
    "pad",
    "plan_attention",
    "reorder",
    "ring_attention",
    "ring_schedule",
    "run_lengths",
    "seqlens_and_offsets",
    "set_max_programs",
    "unpad",
    "validate_layout",
]

__version__ = "0.3.2"

moved.install()
