"""The dense reference as an implementation: ``implementation="reference"``.

O(T_q·T_kv) memory: the oracle every other implementation is tested against
(:func:`thdkit._src.reference.reference_attention`), never chosen automatically.
"""

from __future__ import annotations

from thdkit._src.kernels.base import Implementation
from thdkit._src.reference import reference_attention

__all__ = ["Dense"]


class Dense(Implementation):
    """The whole ``[T_q, T_kv]`` mask and softmax; every configuration, every backend.

    Example:
        >>> Dense().name
        'reference'
    """

    name = "reference"
    features = frozenset({"logits_soft_cap", "prefix"})
    prepares_on_host = True  # it prepares nothing

    def forward(self, query, key, value, q, kv, aux, config, *, scale):
        return reference_attention(
            query,
            key,
            value,
            q_segments=q,
            kv_segments=kv,
            mask_type=config.mask_type,
            window_size=config.window_size,
            scale=scale,
            logits_soft_cap=config.logits_soft_cap,
        )
