"""Context-parallel attention over packed rows: ring, all-gather and all-to-all strategies.

Modules, bottom up: ``base`` (the strategy protocol, its configuration and the registry),
``shards`` (what strategies share), ``schedule`` (which ring steps run), one module per strategy
(``ring``, ``all_gather``, ``all_to_all``), ``registry`` (the built-ins, one line each),
``program`` (a strategy under ``shard_map``), ``api`` (the entry points) and ``traffic`` (the
bytes each strategy moves).
"""

# ruff: noqa: I001  (one re-export per line, as in thdkit/__init__.py)

from thdkit.context_parallel.base import STRATEGIES
from thdkit.context_parallel.base import Strategy
from thdkit.context_parallel.base import StrategyConfig
from thdkit.context_parallel.base import StrategyName
from thdkit.context_parallel.base import names
from thdkit.context_parallel.base import register
from thdkit.context_parallel.base import register_strategy
from thdkit.context_parallel.base import unregister
from thdkit.context_parallel.base import unregister_strategy
from thdkit.context_parallel import registry  # noqa: F401  (fills STRATEGIES)
from thdkit.context_parallel.api import context_parallel_attention
from thdkit.context_parallel.api import ring_attention
from thdkit.context_parallel.schedule import ring_schedule

__all__ = [
    "STRATEGIES",
    "Strategy",
    "StrategyConfig",
    "StrategyName",
    "context_parallel_attention",
    "names",
    "register",
    "register_strategy",
    "ring_attention",
    "ring_schedule",
    "unregister",
    "unregister_strategy",
]
