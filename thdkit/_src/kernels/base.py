"""The attention implementation protocol, the one registry and the default order.

An implementation is an object with these methods (override what applies; every check raises
``NotImplementedError`` with the reason it cannot run, and when no candidate can, one error
lists every reason):

============================  ======================================================  ==========
method                        what it does                                           when
============================  ======================================================  ==========
``check_config(config)``      can it run this :class:`AttentionConfig` at all?        plan time
``check_layout(q, kv, c)``    can it run these (concrete) layouts? host-side only      plan time
``prepare(q, kv, config)``    its own auxiliary data of the layout (a pytree), which   plan time
                              the plan carries under the implementation's name
``check_arrays(q, k, v)``     can it take these arrays (dtype, head dims)?             call time
``forward(...)``              ``(out, lse)``: float32 outputs and log-sum-exps (lse    call time
                              None where the implementation has none)
============================  ======================================================  ==========

``returns_lse`` says whether ``forward`` returns the log-sum-exp; only such implementations
serve :func:`thdkit._src.kernels.partial.attention_partial` and so context parallelism.
``interpreted_on`` names the backends (``jax.default_backend()``) where it runs in an
interpreter (correct, slow: ``thdkit bench attention`` times it there only when named).
``prepares_on_host`` says whether ``prepare`` also runs in NumPy (``ops=thdkit._src.host.NUMPY``,
on Segments of NumPy fields), giving what it gives traced: the entry points then compute the
auxiliary data of host and concrete layouts on the host, so that an eager call compiles only
the forward.

Adding an implementation is one file defining it and one :func:`register` line in
:mod:`thdkit._src.kernels.builtins`; a user may register one of their own the same way (the entry
points find it by name). The convention is that of strategies
(:func:`thdkit.context_parallel.register`): ``register(obj, replace=False)`` takes the name from
``obj.name``, ``unregister(name)`` returns what it removed, :func:`names` lists the names in
registration order.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

from jaxtyping import Array, Float

from thdkit._src.host import JAX, ArrayOps
from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.segments import Segments

__all__ = [
    "Implementation",
    "default_order",
    "get",
    "names",
    "register",
    "unregister",
]


class Implementation:
    """One attention implementation (docs/attention.md, "Implementations").

    Subclasses set ``name`` and override ``forward``, and whichever checks apply; the defaults
    accept everything and prepare nothing.
    """

    name: ClassVar[str]
    returns_lse: ClassVar[bool] = True
    prepares_on_host: ClassVar[bool] = False
    interpreted_on: ClassVar[tuple[str, ...]] = ()

    def check_config(self, config: AttentionConfig) -> None:
        """Raises NotImplementedError where this configuration cannot run (e.g. no GPU)."""
        del config

    def check_layout(self, q: Segments, kv: Segments, config: AttentionConfig) -> None:
        """Raises NotImplementedError where these layouts cannot run; reads values on the host
        where it needs them (never called on a layout it cannot read: it raises instead)."""
        del q, kv, config

    def prepare(
        self, q: Segments, kv: Segments, config: AttentionConfig, *, ops: ArrayOps = JAX
    ) -> Any:
        """The implementation's auxiliary data of one layout (a pytree, traceable); None if
        it needs none. Computed once per plan and passed to every :meth:`forward`. ``ops`` is
        :data:`thdkit._src.host.NUMPY` only where ``prepares_on_host`` is True."""
        del q, kv, config, ops

    def check_arrays(self, query: Array, key: Array, value: Array) -> None:
        """Raises NotImplementedError where it cannot take these (checked) arrays."""
        del query, key, value

    def forward(
        self,
        query: Float[Array, "B T_q H_q D"],
        key: Float[Array, "B T_kv H_kv D"],
        value: Float[Array, "B T_kv H_kv D_v"],
        q: Segments,
        kv: Segments,
        aux: Any,
        config: AttentionConfig,
        *,
        scale: float,
    ) -> tuple[Float[Array, "B T_q H_q D_v"], Float[Array, "B T_q H_q"] | None]:
        """``(out, lse)``: float (out may be in the inputs' dtype) and float32 log-sum-exps
        (-inf where no key is allowed), or ``(out, None)`` where ``returns_lse`` is False."""
        raise NotImplementedError(f"{type(self).__name__} defines no forward")


_REGISTRY: dict[str, Implementation] = {}
_DEFAULT: list[str] = []


def register(
    implementation: Implementation, *, replace: bool = False, default: bool = False
) -> None:
    """Adds an implementation under its ``name``.

    Args:
        implementation: an :class:`Implementation` instance.
        replace: whether it may replace one registered under that name (keeping its place in
            :func:`names`).
        default: whether ``implementation=None`` tries it, after those registered before it.

    Raises:
        TypeError: not an :class:`Implementation`, or a name that is not a string.

    Warns:
        DeprecationWarning: the name is registered already and ``replace`` is False; it is
            replaced for now, and will be a ValueError (as for strategies) in the next release.

    Example:
        >>> class Zeros(Implementation):
        ...     name = "zeros"
        ...     def forward(self, query, key, value, q, kv, aux, config, *, scale):
        ...         return jnp.zeros(query.shape[:3] + value.shape[3:]), None
        >>> register(Zeros())
        >>> names()[-1]
        'zeros'
        >>> register(Zeros(), replace=True)
        >>> type(unregister("zeros")).__name__
        'Zeros'
    """
    if not isinstance(implementation, Implementation):
        raise TypeError(
            f"implementation must be a thdkit.kernels.Implementation, got "
            f"{type(implementation).__name__}"
        )
    name = getattr(implementation, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"implementation.name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and not replace:
        warnings.warn(
            f"implementation {name!r} is registered already; replacing it without "
            f"replace=True is deprecated: use register(implementation, replace=True)",
            DeprecationWarning,
            stacklevel=2,
        )
    _REGISTRY[name] = implementation
    if default and name not in _DEFAULT:
        _DEFAULT.append(name)
    elif not default and name in _DEFAULT:
        _DEFAULT.remove(name)


def unregister(name: str) -> Implementation | None:
    """Removes a registered implementation and returns it.

    Args:
        name: a name of :func:`names`.

    Returns:
        The :class:`Implementation` removed (None for an unknown name, deprecated).

    Warns:
        DeprecationWarning: an unknown ``name``; nothing is removed for now, and it will be a
            ValueError (as for strategies) in the next release.

    Example:
        >>> "reference" in names()
        True
    """
    if name not in _REGISTRY:
        warnings.warn(
            f"unknown implementation {name!r}; unregistering an unknown name is deprecated and "
            f"will raise ValueError (registered: {', '.join(map(repr, _REGISTRY))})",
            DeprecationWarning,
            stacklevel=2,
        )
        return None
    if name in _DEFAULT:
        _DEFAULT.remove(name)
    return _REGISTRY.pop(name)


def names() -> tuple[str, ...]:
    """Every registered implementation's name, in registration order."""
    return tuple(_REGISTRY)


def default_order() -> tuple[str, ...]:
    """The names ``implementation=None`` tries, in order."""
    return tuple(_DEFAULT)


def get(name: Any) -> Implementation:
    """The implementation registered as ``name``.

    Args:
        name: a name of :func:`names`.

    Returns:
        The registered :class:`Implementation` instance (subclass its class to change one
        behaviour of a built-in, then :func:`register` the subclass under a new ``name``).

    Raises:
        ValueError: an unknown name; the message lists the registered ones.

    Example:
        >>> get("reference").name
        'reference'
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown implementation {name!r}; valid: {', '.join(map(repr, _REGISTRY))} or None"
        )
    return _REGISTRY[name]
