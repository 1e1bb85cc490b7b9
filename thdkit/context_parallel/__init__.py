"""Context-parallel attention over packed rows: the entry points, the strategy protocol for
implementers and the registry of strategies (docs/context-parallel.md).

A strategy is a :class:`Strategy` (its ``name``, the per-device body ``local`` and the shape
``check``; the cost model ``traffic`` / ``work`` is optional and read by the bench only; the
optional features its body implements, soft-capped logits and attention sinks, are declared in
``features`` and refused to a strategy that does not declare them);
:func:`register` makes it reachable by name from :func:`context_parallel_attention` and
:class:`thdkit.flax.PackedSelfAttention` (``strategy=``).
"""

# ruff: noqa: I001  (one re-export per line, as in thdkit/__init__.py)

from thdkit._src.context_parallel.base import STRATEGIES
from thdkit._src.context_parallel.base import Call
from thdkit._src.context_parallel.base import Shapes
from thdkit._src.context_parallel.base import Strategy
from thdkit._src.context_parallel.base import StrategyConfig
from thdkit._src.context_parallel.base import StrategyName
from thdkit._src.context_parallel.base import Traffic
from thdkit._src.context_parallel.base import get
from thdkit._src.context_parallel.base import names
from thdkit._src.context_parallel.base import register
from thdkit._src.context_parallel.base import register_strategy  # noqa: F401  (deprecated)
from thdkit._src.context_parallel.base import unregister
from thdkit._src.context_parallel.base import unregister_strategy  # noqa: F401  (deprecated)
from thdkit._src.context_parallel import builtins  # noqa: F401  (fills STRATEGIES)
from thdkit._src.context_parallel.api import context_parallel_attention
from thdkit._src.context_parallel.api import ring_attention
from thdkit._src.context_parallel.schedule import ring_schedule
from thdkit._src.context_parallel.traffic import collective_bytes

__all__ = [
    "STRATEGIES",
    "Call",
    "Shapes",
    "Strategy",
    "StrategyConfig",
    "StrategyName",
    "Traffic",
    "collective_bytes",
    "context_parallel_attention",
    "get",
    "names",
    "register",
    "ring_attention",
    "ring_schedule",
    "unregister",
]
