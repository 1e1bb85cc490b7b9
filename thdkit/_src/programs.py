"""thdkit's own compiled programs, kept in one least-recently-used cache of bounded size.

``jax.jit`` keeps every program it compiles for the life of the function it wraps, and every
XLA:CPU program holds memory mappings (about 17 each for a small program, hundreds for an
attention step; measured with ``/proc/self/maps``). A process that calls thdkit eagerly on many
shapes (a notebook, an evaluation loop over variable-length batches) would grow until the
kernel's per-process limit (``vm.max_map_count``, 65,530 by default) and fail inside XLA.

:func:`program` is thdkit's ``jax.jit``: each (static arguments, input shapes and dtypes) gets its
own jitted function, held in one process-wide LRU of :func:`max_programs` entries; evicting an
entry drops the function and, with it, everything JAX cached for it (its compiled program
included). Under a caller's ``jit`` or ``grad`` the same entries are traced into the caller's
program. Programs the user compiles themselves are theirs: ``jax.clear_caches()`` releases them
(docs/attention.md, "Compiled programs"). The cache is safe to share between threads.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np

from thdkit._src.limits import check_int

__all__ = ["cache_info", "max_programs", "program", "set_max_programs"]


class _LRU:
    """A least-recently-used map of bounded size, safe to share between threads: lookup,
    reordering and eviction happen under one lock, so that another thread's eviction can never
    fall between a lookup and its reordering. The values are built outside the lock."""

    def __init__(self, limit: int) -> None:
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.limit = limit
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}

    def __len__(self) -> int:
        with self._lock:  # not mid-way between another thread's insertion and eviction
            return len(self._entries)

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value of ``key``, made by ``make()`` and stored when absent."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self.stats["hits"] += 1
                self._entries.move_to_end(key)
                return value
            self.stats["misses"] += 1
        value = make()
        with self._lock:  # another thread may have stored one meanwhile: keep the first
            value = self._entries.setdefault(key, value)
            self._entries.move_to_end(key)
            self._evict()
        return value

    def resize(self, limit: int) -> None:
        with self._lock:
            self.limit = limit
            self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)
            self.stats["evictions"] += 1


_CACHE = _LRU(64)


def max_programs() -> int:
    """How many compiled thdkit programs are kept (default 64)."""
    return _CACHE.limit


def set_max_programs(limit: int) -> None:
    """Sets how many compiled thdkit programs are kept; the oldest beyond it are dropped now.

    Args:
        limit: an int >= 1.

    Raises:
        TypeError: not an int.
        ValueError: below 1.

    Example:
        >>> old = max_programs()
        >>> set_max_programs(32); max_programs()
        32
        >>> set_max_programs(old)
    """
    _CACHE.resize(check_int(limit, "limit", low=1))


def cache_info() -> dict[str, int]:
    """``{"size", "max_programs", "hits", "misses", "evictions"}`` of the program cache."""
    return dict(size=len(_CACHE), max_programs=_CACHE.limit, **_CACHE.stats)


def _signature(leaf: Any) -> Hashable:
    """What a compiled program depends on of one dynamic input."""
    aval = getattr(leaf, "aval", None)
    if aval is not None:  # jax arrays and tracers
        sharding = None if isinstance(leaf, jax.core.Tracer) else getattr(leaf, "sharding", None)
        return (aval.shape, aval.dtype, getattr(aval, "weak_type", False), sharding)
    if isinstance(leaf, np.ndarray | np.generic):
        return (leaf.shape, leaf.dtype)
    return (type(leaf), leaf)


def program(
    fn: Callable[..., Any] | None = None, *, static_argnames: Sequence[str] = ()
) -> Callable[..., Any]:
    """``jax.jit(fn, static_argnames=...)``, its programs kept in thdkit's bounded cache.

    Static arguments are passed by keyword; every other argument is a pytree of arrays.

    Args:
        fn: the function (or None, to use ``program`` as a decorator with options).
        static_argnames: the keyword arguments that are static (hashable).

    Returns:
        A function with ``fn``'s signature.

    Example:
        >>> @program(static_argnames=("power",))
        ... def raise_to(x, *, power):
        ...     return x**power
        >>> raise_to(jnp.arange(3.0), power=2)
        Array([0., 1., 4.], dtype=float32)
    """
    if fn is None:
        return functools.partial(program, static_argnames=static_argnames)
    static = frozenset(static_argnames)
    names = tuple(static)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        statics = tuple(sorted((k, v) for k, v in kwargs.items() if k in static))
        dynamic = {k: v for k, v in kwargs.items() if k not in static}
        leaves, tree = jax.tree.flatten((args, dynamic))
        key = (fn, statics, tree, tuple(_signature(leaf) for leaf in leaves))
        jitted = _CACHE.get(key, lambda: jax.jit(functools.partial(fn), static_argnames=names))
        return jitted(*args, **kwargs)

    return call
