"""The plan of one packed layout: its Segments, its configuration, and each candidate's own data.

A plan is computed once per batch (:func:`thdkit.plan_attention`) and read by every layer: the
implementations that can run this configuration and layout are chosen here, in the order they
are tried (:func:`candidates`), and each one's auxiliary data (``prepare``) is computed once and
carried under its name. Nothing in this module names an implementation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from thdkit._src.host import NUMPY, on_host, readable
from thdkit._src.kernels import base
from thdkit._src.kernels.config import AttentionConfig
from thdkit._src.programs import program
from thdkit._src.segments import Segments

__all__ = [
    "AttentionPlan",
    "candidates",
    "host_segments",
    "make_plan",
    "no_candidate",
    "prepare_on_host",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Everything :func:`thdkit.attention` needs of one packed layout, computed once per batch.

    A pytree: it passes through ``jax.jit`` (as an argument or closed over), ``jax.lax.scan``
    and ``shard_map``; the configuration and the candidates are static.

    Attributes:
        q_segments: :class:`thdkit.Segments` of the queries, int32[B, T_q] fields.
        kv_segments: of the keys/values (the query's for self-attention).
        aux: each candidate's auxiliary data by implementation name (e.g. ``"blockwise"``: its
            :class:`thdkit.kernels.TileRanges`; ``"cudnn"``: compact metadata and key spans).
        candidates: the implementations that can run this layout, in the order tried: the first
            that takes the call's arrays runs (static).
        config: the :class:`thdkit.kernels.AttentionConfig` (static).
    """

    q_segments: Segments
    kv_segments: Segments
    aux: dict[str, Any]
    candidates: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    config: AttentionConfig = dataclasses.field(metadata=dict(static=True))

    @property
    def implementation(self) -> str:
        """The first candidate: what runs unless the arrays rule it out."""
        return self.candidates[0]


def no_candidate(reasons: dict[str, str]) -> NotImplementedError:
    """The error when no implementation can run: every candidate's reason, listed."""
    listed = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    return NotImplementedError(f"no implementation can run this attention ({listed})")


def candidates(
    q: Segments, kv: Segments, config: AttentionConfig, implementation: str | None
) -> tuple[str, ...]:
    """The implementations whose configuration and layout checks pass, in the order tried.

    Args:
        q, kv: the checked Segments of both sides (kv is q for self-attention).
        config: the parsed configuration.
        implementation: a registered name, or None for the default order.

    Returns:
        Names, at least one.

    Raises:
        ValueError: an unknown implementation name.
        NotImplementedError: none can run; the message lists every reason.

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 2, 2]]))
        >>> config = AttentionConfig.parse(mask_type="causal", window_size=None,
        ...     max_segments_per_seq=2, seq_q=4, seq_kv=4, self_attention=True)
        >>> candidates(seg, seg, config, "reference")
        ('reference',)
    """
    names = base.default_order() if implementation is None else (base.get(implementation).name,)
    chosen, reasons = [], {}
    for name in names:
        candidate = base.get(name)
        try:
            base.check_features(candidate, config)
            candidate.check_config(config)
            candidate.check_segments(q, kv, config)
        except NotImplementedError as reason:
            reasons[name] = str(reason)
            continue
        chosen.append(name)
    if not chosen:
        raise no_candidate(reasons)
    return tuple(chosen)


def host_segments(q: Segments, kv: Segments) -> tuple[Segments, Segments] | None:
    """Both sides with NumPy fields when they are host data or concrete JAX arrays (read back
    once); None when any field is traced (or not addressable from this process).

    Example:
        >>> seg = Segments.from_ids(jnp.array([[1, 1, 2, 2]]))
        >>> type(host_segments(seg, seg)[0].ids).__name__
        'ndarray'
    """
    fields = jax.tree.map(readable, (q, kv))
    return fields if on_host(*jax.tree.leaves(fields)) else None


def prepare_on_host(
    q: Segments,
    kv: Segments,
    implementations: tuple[base.Implementation, ...],
    config: AttentionConfig,
) -> dict[str, Any] | None:
    """Each implementation's auxiliary data computed in NumPy, compiling nothing.

    Args:
        q, kv: the checked Segments of both sides (kv is q for self-attention).
        implementations: the candidates, in order.
        config: the parsed configuration.

    Returns:
        ``{name: aux}`` with NumPy leaves, or None where a side is traced or an implementation
        cannot prepare on the host (``prepares_on_host`` False): then the caller prepares in a
        compiled program.

    Example:
        >>> seg = Segments.from_ids(np.array([[1, 1, 2, 2]]))
        >>> config = AttentionConfig.parse(mask_type="causal", window_size=None,
        ...     max_segments_per_seq=2, seq_q=4, seq_kv=4, self_attention=True)
        >>> prepare_on_host(seg, seg, (base.get("blockwise"),), config)["blockwise"].hi
        array([[1]], dtype=int32)
    """
    host = host_segments(q, kv)
    if host is None or not all(impl.prepares_on_host for impl in implementations):
        return None
    return {impl.name: impl.prepare(*host, config, ops=NUMPY) for impl in implementations}


def make_plan(
    q: Segments, kv: Segments, config: AttentionConfig, implementation: str | None
) -> AttentionPlan:
    """The plan of checked Segments: candidates chosen, their auxiliary data computed.

    Host and concrete layouts are prepared in NumPy where every candidate can
    (``prepares_on_host``), compiling nothing, and the results put on the device once; otherwise
    eagerly one compiled program per (shapes, configuration, candidates). Inside the caller's
    ``jit`` it is traced into the caller's program.

    Args:
        q, kv: the checked Segments of both sides (kv is q for self-attention).
        config: the parsed configuration.
        implementation: a registered name, or None for the default order.

    Returns:
        :class:`AttentionPlan`.
    """
    names = candidates(q, kv, config, implementation)
    implementations = tuple(base.get(n) for n in names)
    aux = prepare_on_host(q, kv, implementations, config)
    if aux is None:
        aux = _prepare(q, kv, implementations=implementations, config=config)
    else:
        aux = jax.device_put(aux)
    return AttentionPlan(q, kv, aux, names, config)


@program(static_argnames=("implementations", "config"))
def _prepare(q, kv, *, implementations, config) -> dict[str, Any]:
    return {impl.name: impl.prepare(q, kv, config) for impl in implementations}
