"""The attention implementation protocol, the one registry and the default order.

An implementation is an object with these methods (override what applies; every check raises
``NotImplementedError`` with the reason it cannot run, and when no candidate can, one error
lists every reason):

============================  ======================================================  ==========
method                        what it does                                           when
============================  ======================================================  ==========
``check_config(config)``      can it run this :class:`AttentionConfig` at all?        plan time
``check_segments(q, kv, c)``  can it run these (concrete) Segments? host-side only     plan time
``prepare(q, kv, config)``    its own auxiliary data of the layout (a pytree), which   plan time
                              the plan carries under the implementation's name
``check_arrays(q, k, v)``     can it take these arrays (dtype, head dims)?             call time
``forward(...)``              ``(out, lse)``: float32 outputs and log-sum-exps (lse    call time
                              None where the implementation has none)
============================  ======================================================  ==========

``returns_lse`` says whether ``forward`` returns the log-sum-exp; only such implementations
serve :func:`thdkit.kernels.attention_partial`, context parallelism and attention sinks (which
join each row's softmax through its log-sum-exp, outside the implementation).
``features`` names the optional features it implements (:data:`FEATURES`): a configuration or a
layout that asks for one it lacks is refused before its own checks run, with the feature named,
so that an implementation written before a feature existed refuses it rather than ignore it.
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

``check_segments`` was called ``check_layout`` until this release (a name that
:func:`thdkit.check_layout`, the checkify check of a layout's rules, holds): a subclass that
still overrides ``check_layout`` and not ``check_segments`` gets a ``DeprecationWarning`` when the
class is created, and its ``check_layout`` serves as its ``check_segments``; calling
``check_layout`` warns and runs ``check_segments``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from jaxtyping import Array, Float

from thdkit._src.host import JAX, ArrayOps
from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.segments import Segments

__all__ = [
    "FEATURES",
    "Implementation",
    "check_features",
    "check_name",
    "default_order",
    "get",
    "names",
    "register",
    "unregister",
]


FEATURES = {
    "logits_soft_cap": "soft-capped logits (AttentionConfig.logits_soft_cap)",
    "prefix": "per-document prefix-LM masks (Segments.prefix_lengths)",
}
"""The optional features an implementation may declare in ``features``, with what each is."""


def _deprecated_check_layout(check_segments: Callable[..., None]) -> Callable[..., None]:
    """The old name of ``check_segments`` on one class: warns, then runs that class's method
    (not an override's: a subclass's ``super().check_layout()`` reaches the class above)."""

    def check_layout(
        self: Implementation, q: Segments, kv: Segments, config: AttentionConfig
    ) -> None:
        """Deprecated: :meth:`Implementation.check_segments` (warns, then runs it)."""
        warnings.warn(
            f"{type(self).__name__}.check_layout is renamed check_segments: call check_segments",
            DeprecationWarning,
            stacklevel=2,
        )
        return check_segments(self, q, kv, config)

    return check_layout


class Implementation:
    """One attention implementation (docs/attention.md, "Implementations").

    Subclasses set ``name`` and override ``forward``, and whichever checks apply; the defaults
    accept everything and prepare nothing.
    """

    name: ClassVar[str]
    features: ClassVar[frozenset[str]] = frozenset()
    returns_lse: ClassVar[bool] = True
    prepares_on_host: ClassVar[bool] = False
    interpreted_on: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Takes a subclass's ``check_layout`` (the old name) as its ``check_segments``, warning;
        gives one that defines ``check_segments`` the deprecated ``check_layout`` calling it."""
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "check_layout" in own and "check_segments" not in own:
            warnings.warn(
                f"{cls.__qualname__} overrides check_layout, which is renamed check_segments: "
                "rename the method (it serves as check_segments for now)",
                DeprecationWarning,
                stacklevel=2,
            )
            cls.check_segments = own["check_layout"]
        elif "check_segments" in own and "check_layout" not in own:
            cls.check_layout = _deprecated_check_layout(own["check_segments"])

    def check_config(self, config: AttentionConfig) -> None:
        """Raises NotImplementedError where this configuration cannot run (e.g. no GPU)."""
        del config

    def check_segments(self, q: Segments, kv: Segments, config: AttentionConfig) -> None:
        """Raises NotImplementedError where these Segments cannot run; reads values on the host
        where it needs them (never called on Segments it cannot read: it raises instead)."""
        del q, kv, config

    check_layout = _deprecated_check_layout(check_segments)

    def prepare(
        self, q: Segments, kv: Segments, config: AttentionConfig, *, ops: ArrayOps = JAX
    ) -> Any:
        """The implementation's auxiliary data of one layout (a pytree, traceable); None if
        it needs none. Computed once per plan and passed to every :meth:`forward`. ``ops`` is
        ``NUMPY`` only where ``prepares_on_host`` is True."""
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


def check_features(
    implementation: Implementation, config: AttentionConfig, *, sinks: bool = False
) -> None:
    """Raises NotImplementedError where ``config`` asks for a feature the implementation does
    not declare in ``features``, naming each missing one, or where the call has attention sinks
    and the implementation returns no log-sum-exp (``returns_lse``: sinks join through it).

    Example:
        >>> config = AttentionConfig.parse(mask_type="causal", window_size=None,
        ...     max_segments_per_seq=1, logits_soft_cap=30.0)
        >>> check_features(Implementation(), config)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        NotImplementedError: it does not implement soft-capped logits (AttentionConfig...
    """
    reasons = []
    missing = sorted(config.features - frozenset(implementation.features))
    if missing:
        listed = ", ".join(FEATURES.get(name, name) for name in missing)
        reasons.append(f"it does not implement {listed}")
    if sinks and not implementation.returns_lse:
        reasons.append("it returns no log-sum-exp, through which attention sinks join")
    if reasons:
        raise NotImplementedError("; ".join(reasons))


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


_UNKNOWN = "unknown implementation {name}; valid: {valid}"


def check_name(
    name: Any, *, among: Sequence[str] | None = None, words: str = _UNKNOWN, optional: bool = True
) -> str | None:
    """``name`` checked against the registered implementations' names, or ``among``.

    The one check of an implementation's name: :func:`get`, and each entry point that takes an
    ``implementation`` keyword with its own list and in its own words.

    Args:
        name: what the caller passed.
        among: the accepted names, in the order the message lists them; None for :func:`names`.
        words: the message, a format of ``{name}`` (the ``repr`` of what was passed) and
            ``{valid}`` (the accepted names, then "or None").
        optional: whether None passes (it names no implementation: the default order).

    Returns:
        ``name``, a str, or None.

    Raises:
        ValueError: ``name`` not among the accepted names (a non-string included).

    Example:
        >>> check_name("reference"), check_name(None)
        ('reference', None)
        >>> check_name("flash", among=("xla",), words="implementation must be one of {valid}, "
        ...            "got {name}")
        Traceback (most recent call last):
        ...
        ValueError: implementation must be one of 'xla' or None, got 'flash'
    """
    if name is None and optional:
        return None
    valid = tuple(_REGISTRY) if among is None else tuple(among)
    if not isinstance(name, str) or name not in valid:
        listed = ", ".join(map(repr, valid))
        raise ValueError(words.format(name=repr(name), valid=f"{listed} or None"))
    return name


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
    return _REGISTRY[check_name(name, optional=False)]
