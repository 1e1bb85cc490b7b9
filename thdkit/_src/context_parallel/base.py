"""The strategy protocol of context parallelism: its configuration, its parts and the registry.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims,
S = ``max_segments_per_seq``, cp = size of the context-parallel mesh axis, n = T / cp tokens per
shard.

A strategy is a :class:`Strategy`: the per-device body run under ``shard_map`` on this rank's
shards, the check of the shapes it can split, the bytes its collectives move (the closed form
:func:`thdkit.context_parallel.collective_bytes` and ``thdkit bench cp`` report) and
the attention calls each rank makes (the work ``thdkit bench cp`` counts); the last two are optional
(the cost model of the bench). :data:`STRATEGIES` maps names to strategies; :func:`register` adds
one, :func:`unregister` removes one, :func:`names` lists them. This module is the bottom of the
package: it imports nothing of :mod:`thdkit.context_parallel`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias

from jax.sharding import Mesh
from jaxtyping import Array, Float

from thdkit._src.mask_types import MaskType, Window
from thdkit._src.segments import Segments

__all__ = [
    "FEATURES",
    "STRATEGIES",
    "Call",
    "LocalBody",
    "Shapes",
    "Strategy",
    "StrategyConfig",
    "StrategyName",
    "Traffic",
    "Work",
    "check_features",
    "get",
    "names",
    "no_check",
    "register",
    "register_strategy",
    "unregister",
    "unregister_strategy",
]

StrategyName: TypeAlias = Literal["ring", "all_gather", "all_to_all"] | str
"""A key of :data:`STRATEGIES`: a built-in name, or the name of one given to :func:`register`."""

FEATURES = {
    "logits_soft_cap": "soft-capped logits (StrategyConfig.logits_soft_cap)",
    "sinks": "attention sinks (the body's sinks keyword)",
    "prefix": "per-document prefix-LM masks (Segments.prefix_lengths, carried to every shard)",
}
"""The optional features a strategy may declare in ``Strategy.features``, with what each is."""


class StrategyConfig(NamedTuple):
    """The checked static configuration a strategy is built for (hashable: programs are cached).

    The fields carry the names of :func:`thdkit.context_parallel_attention`'s options; the
    earlier names ``mask``, ``window`` and ``num_segments`` still read, with a
    DeprecationWarning, for one release.

    Attributes:
        mesh: the device mesh.
        axis_name: the mesh axis the sequence axis is sharded over (size cp).
        mask_type: the parsed mask type.
        window_size: the parsed window ``(left, right)``, or None.
        max_segments_per_seq: S.
        scale: multiplier of the logits.
        self_attention: whether the keys share the queries' layout (no kv layout was given).
        implementation: the local attention, a name of
            :func:`thdkit.kernels.partial_implementations`.
        logits_soft_cap: ``cap`` of the soft cap ``cap * tanh(logit / cap)`` applied to the
            scaled logits before the mask (docs/semantics.md, "Soft-capped logits"), or None;
            a strategy passes it to every :func:`thdkit.kernels.attention_partial` it calls.

    Example:
        >>> mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
        >>> config = StrategyConfig(mesh, "cp", MaskType.CAUSAL, None, 4, 0.5, True, "blockwise")
        >>> config.cp, config.max_segments_per_seq, config.logits_soft_cap
        (2, 4, None)
    """

    mesh: Mesh
    axis_name: str
    mask_type: MaskType
    window_size: Window
    max_segments_per_seq: int
    scale: float
    self_attention: bool
    implementation: str
    logits_soft_cap: float | None = None

    @property
    def cp(self) -> int:
        """The size of the context-parallel axis."""
        return int(self.mesh.shape[self.axis_name])

    @property
    def features(self) -> frozenset[str]:
        """The optional features (:data:`FEATURES`) this configuration asks of a strategy:
        ``"logits_soft_cap"`` where a cap is set (sinks are an argument of the call, not of the
        configuration)."""
        return frozenset({"logits_soft_cap"} if self.logits_soft_cap is not None else ())

    @property
    def mask(self) -> MaskType:
        """Deprecated: :attr:`mask_type`."""
        return _renamed(self, "mask", "mask_type")

    @property
    def window(self) -> Window:
        """Deprecated: :attr:`window_size`."""
        return _renamed(self, "window", "window_size")

    @property
    def num_segments(self) -> int:
        """Deprecated: :attr:`max_segments_per_seq`."""
        return _renamed(self, "num_segments", "max_segments_per_seq")


def _renamed(config: StrategyConfig, old: str, new: str) -> Any:
    """``config.<new>``, warning that ``config.<old>`` is deprecated (the warning points at the
    line that read the old name)."""
    warnings.warn(
        f"StrategyConfig.{old} is deprecated and goes in the next release: read "
        f"StrategyConfig.{new}",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(config, new)


class Shapes(NamedTuple):
    """The global shapes of one attention call (b = ``itemsize``; ``cross``: a kv layout given).

    Example:
        >>> x = jnp.zeros((2, 16, 4, 8))
        >>> Shapes.of(x, x, x, cross=False).heads_q
        4
    """

    batch: int
    seq_q: int
    seq_kv: int
    heads_q: int
    heads_kv: int
    dim: int
    dim_v: int
    itemsize: int
    cross: bool

    @classmethod
    def of(cls, query: Array, key: Array, value: Array, *, cross: bool) -> Shapes:
        """The shapes of ``query`` [B, T_q, H_q, D], ``key`` [B, T_kv, H_kv, D] and ``value``
        [B, T_kv, H_kv, D_v]."""
        batch, seq_q, heads_q, dim = query.shape
        _, seq_kv, heads_kv, _ = key.shape
        itemsize = query.dtype.itemsize
        return cls(batch, seq_q, seq_kv, heads_q, heads_kv, dim, value.shape[3], itemsize, cross)


class Traffic(NamedTuple):
    """Bytes received per device, and dependent collective steps, of one strategy."""

    forward: float
    backward: float
    steps_forward: int
    steps_backward: int


class Call(NamedTuple):
    """One attention call of a rank: its queries' and keys' part of the row, and the heads.

    Attributes:
        q: the queries' :class:`thdkit.Segments` of the call, int32[B, n_q] fields (global
            document lengths).
        kv: the keys', int32[B, n_kv] fields.
        heads_split: the call computes ``H / heads_split`` of the heads (1: all of them).
    """

    q: Segments
    kv: Segments
    heads_split: int


LocalBody: TypeAlias = Callable[..., Float[Array, "B n H Dv"]]
"""``local(q, k, v, q_segments, kv_segments[, *, sinks]) -> out``: a strategy's per-device body.

Run under ``shard_map`` over the cp axis on this rank's shards: q [B, n_q, H_q, D], k
[B, n_kv, H_kv, D], v [B, n_kv, H_kv, D_v] and the :class:`thdkit.Segments` of its tokens
(int32[B, n] fields; ``lengths`` are the shard's own run lengths: a strategy that needs the
document lengths of the whole row derives them, e.g. with
:func:`thdkit._src.context_parallel.shards.with_document_lengths`). Under self-attention
``kv_segments is q_segments``. Returns the output shard, [B, n_q, H_q, D_v], in any float dtype
(the entry point casts it to the query's).

The keyword ``sinks`` is passed only when the call has attention sinks, and only to a strategy
that declares the feature ``"sinks"`` (``Strategy.features``): float32[H_q], the same on every
rank, differentiable. The body joins them once per row after its partial results are merged
(:func:`thdkit.kernels.attach_sinks` on the merged ``(out, lse)``; docs/semantics.md,
"Attention sinks"), each query head with its own.
"""


class Work(Protocol):
    """``work(q, kv, *, cp, mask_type, window_size, max_segments_per_seq) -> calls``: each rank's
    attention calls.

    ``q`` and ``kv`` are the whole rows' :class:`thdkit.Segments` in the order the shards hold
    them (int32[B, T] fields, global document lengths); ``calls[r]`` lists the attention calls
    (:class:`Call`) rank r makes. Host-side; used by ``thdkit bench cp`` to count the visited tiles.
    """

    def __call__(
        self,
        q: Segments,
        kv: Segments,
        *,
        cp: int,
        mask_type: MaskType,
        window_size: Window,
        max_segments_per_seq: int,
    ) -> list[list[Call]]: ...


def no_check(shapes: Shapes, cp: int) -> None:
    """The check of a strategy that can split any shapes the entry point accepts."""
    del shapes, cp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Strategy:
    """One context-parallel strategy: what :func:`thdkit.context_parallel_attention` runs.

    What running needs (``local``, ``check``) is apart from the cost model of ``thdkit bench cp``
    (``traffic``, ``work``): a strategy without the latter runs all the same, and the bench reports
    "no cost model" for it.

    Attributes:
        local: ``(config) -> body``: builds the per-device body (:data:`LocalBody`) for a
            :class:`StrategyConfig`.
        name: its name in :data:`STRATEGIES` (a Python identifier; :func:`register` reads it).
        check: ``(shapes, cp) -> None``; raises ValueError for shapes the strategy cannot split
            (it runs after the entry point's own checks, which every strategy shares).
        traffic: ``(shapes, cp) -> Traffic``: bytes each device receives through the strategy's
            collectives, forward and backward, and its dependent collective steps, as a closed
            form of the :class:`Shapes` (O(B·S) per-segment counts left out); None: no cost
            model.
        work: each rank's attention calls (:class:`Work`); None: no cost model.
        features: the optional features the body implements (:data:`FEATURES`):
            ``"logits_soft_cap"`` (it passes ``StrategyConfig.logits_soft_cap`` to its attention
            calls) and ``"sinks"`` (its body takes the ``sinks`` keyword, :data:`LocalBody`). A
            call that asks for a feature the strategy does not declare is refused
            (:func:`check_features`), so that a strategy written before a feature existed
            refuses it rather than ignore it.
    """

    local: Callable[[StrategyConfig], LocalBody]
    name: str = ""
    check: Callable[[Shapes, int], None] = no_check
    traffic: Callable[[Shapes, int], Traffic] | None = None
    work: Work | None = None
    features: frozenset[str] = frozenset()


def check_features(
    strategy: Strategy, config: StrategyConfig, *, sinks: bool, prefix: bool = False
) -> None:
    """Raises NotImplementedError where the call asks for a feature the strategy does not
    declare in ``Strategy.features``, naming the strategy and each missing feature.

    Args:
        strategy: the strategy chosen.
        config: its configuration (:attr:`StrategyConfig.features`).
        sinks: whether the call has attention sinks.
        prefix: whether the layout carries document prefixes.

    Raises:
        NotImplementedError: a feature asked for and not declared.

    Example:
        >>> mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
        >>> config = StrategyConfig(mesh, "cp", MaskType.CAUSAL, None, 4, 0.5, True, "blockwise",
        ...                         logits_soft_cap=30.0)
        >>> mine = Strategy(name="mine", local=lambda config: None)
        >>> check_features(mine, config, sinks=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        NotImplementedError: strategy='mine' does not implement soft-capped logits (...), ...
    """
    asked = config.features | {name for name, on in (("sinks", sinks), ("prefix", prefix)) if on}
    missing = sorted(asked - frozenset(strategy.features))
    if missing:
        listed = ", ".join(FEATURES.get(name, name) for name in missing)
        raise NotImplementedError(
            f"strategy={strategy.name!r} does not implement {listed}; declare them in "
            "Strategy.features once its body implements them"
        )


STRATEGIES: dict[str, Strategy] = {}
"""Every strategy by name, in registration order (the built-ins:
``builtins``). Add one with :func:`register`."""


def register(strategy: Strategy, *, replace: bool = False) -> None:
    """Adds a strategy to :data:`STRATEGIES` under ``strategy.name``, for
    ``context_parallel_attention(strategy=name)``.

    Args:
        strategy: the :class:`Strategy`; its ``name`` a Python identifier.
        replace: whether it may replace one registered under that name (keeping its place).

    Raises:
        TypeError: ``strategy`` is not a :class:`Strategy`.
        ValueError: its name is not an identifier, or is registered already and ``replace`` is
            False.

    Example:
        >>> register(STRATEGIES["ring"])
        Traceback (most recent call last):
        ...
        ValueError: strategy 'ring' is registered already; pass replace=True to replace it
        >>> register(STRATEGIES["ring"], replace=True)
        >>> names()
        ('ring', 'all_gather', 'all_to_all')
    """
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a Strategy, got {type(strategy).__name__}")
    name = strategy.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"strategy.name must be a Python identifier, got {name!r}")
    if name in STRATEGIES and not replace:
        raise ValueError(
            f"strategy {name!r} is registered already; pass replace=True to replace it"
        )
    STRATEGIES[name] = strategy


def unregister(name: str) -> Strategy:
    """Removes a strategy from :data:`STRATEGIES` and returns it.

    Raises:
        ValueError: ``name`` is not registered (listing the registered ones).

    Example:
        >>> unregister("ulysses")
        Traceback (most recent call last):
        ...
        ValueError: unknown strategy 'ulysses'; valid: 'ring', 'all_gather', 'all_to_all'
    """
    get(name)
    return STRATEGIES.pop(name)


def names() -> tuple[str, ...]:
    """Every registered strategy's name, in registration order.

    Example:
        >>> names()
        ('ring', 'all_gather', 'all_to_all')
    """
    return tuple(STRATEGIES)


def register_strategy(name: str, strategy: Strategy) -> None:
    """Deprecated: ``register(dataclasses.replace(strategy, name=name))``.

    Raises:
        TypeError, ValueError: as :func:`register` (replacing is refused).

    Warns:
        DeprecationWarning: always; the spelling goes in the next release.

    Example:
        >>> import pytest
        >>> with pytest.warns(DeprecationWarning, match="register"):
        ...     register_strategy("again", STRATEGIES["ring"])
        >>> unregister("again").name
        'again'
    """
    warnings.warn(
        "register_strategy(name, strategy) is deprecated: give the Strategy its name and call "
        "thdkit.context_parallel.register(strategy)",
        DeprecationWarning,
        stacklevel=2,
    )
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a Strategy, got {type(strategy).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a strategy name must be a Python identifier, got {name!r}")
    register(dataclasses.replace(strategy, name=name))


def unregister_strategy(name: str) -> Strategy:
    """Deprecated: :func:`unregister`.

    Raises:
        ValueError: ``name`` is not registered.

    Warns:
        DeprecationWarning: always; the spelling goes in the next release.
    """
    warnings.warn(
        "unregister_strategy(name) is deprecated: use thdkit.context_parallel.unregister(name)",
        DeprecationWarning,
        stacklevel=2,
    )
    return unregister(name)


def get(name: object) -> Strategy:
    """The strategy registered as ``name``.

    Args:
        name: a name of :func:`names`.

    Returns:
        The registered :class:`Strategy` (``dataclasses.replace`` it to register a variant).

    Raises:
        ValueError: an unknown name, listing the registered ones.

    Example:
        >>> get("all_gather") is STRATEGIES["all_gather"]
        True
    """
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(map(repr, STRATEGIES))}")
    return STRATEGIES[name]
