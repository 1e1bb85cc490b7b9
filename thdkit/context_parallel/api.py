"""Context-parallel attention over packed rows: the entry point and the registry of strategies.

Axis legend: B batch, T_q / T_kv row lengths, H_q / H_kv heads, D / D_v head dims,
S = ``max_segments_per_seq``, cp = size of the context-parallel mesh axis, n = T / cp tokens per
shard.

The sequence axis of every input is split into cp contiguous shards over one mesh axis. A strategy
is a per-device function of the shards (:class:`Strategy`); this module checks the arguments once
for all of them (the attention checks of :mod:`thdkit.kernels.arguments`, the mesh, the split of
T, each concrete shard's layout) and runs the chosen one under ``jax.shard_map``:

- ``"ring"`` (:mod:`~thdkit.context_parallel.ring`): key/value shards travel around the ring,
  cp - 1 dependent steps, skipping steps without work.
- ``"all_gather"`` (:mod:`~thdkit.context_parallel.all_gather`): keys/values gathered once; each
  rank attends its query shard to the whole row.
- ``"all_to_all"`` (:mod:`~thdkit.context_parallel.all_to_all`): an exchange gives every rank the
  whole row for H / cp heads; one plan of the row, attention, and the exchange back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Required, TypedDict, Unpack, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, ArrayLike, Float

from thdkit.kernels.arguments import check_arguments, check_layout_shapes
from thdkit.context_parallel.all_gather import all_gather_local
from thdkit.context_parallel.all_to_all import all_to_all_local, check_heads
from thdkit.context_parallel.ring import ring_local
from thdkit.inputs import as_layouts
from thdkit.layout import validate_layout
from thdkit.limits import check_max_segments, is_concrete
from thdkit.mask_types import MaskType, Window, check_window

__all__ = [
    "STRATEGIES",
    "LocalImplementation",
    "RingOptions",
    "Strategy",
    "StrategyConfig",
    "StrategyName",
    "check_mesh",
    "context_parallel_attention",
    "ring_attention",
]

StrategyName = Literal["ring", "all_gather", "all_to_all"]
LocalImplementation = Literal["blockwise", "pallas"]


class StrategyConfig(NamedTuple):
    """The checked static configuration a strategy is built for (hashable: programs are cached).

    Attributes:
        mesh: the device mesh.
        axis_name: the mesh axis the sequence axis is sharded over (size cp).
        mask: the parsed mask type.
        window: the parsed window, or None.
        num_segments: S.
        scale: multiplier of the logits.
        self_attention: whether the keys share the queries' layout (no kv ids were given).
        implementation: the local attention, ``"blockwise"`` or ``"pallas"``.
    """

    mesh: Mesh
    axis_name: str
    mask: MaskType
    window: Window
    num_segments: int
    scale: float
    self_attention: bool
    implementation: LocalImplementation = "blockwise"


class Strategy(NamedTuple):
    """One context-parallel strategy.

    Attributes:
        local: ``(config) -> fn(q, k, v, ids_q, pos_q, ids_kv, pos_kv) -> out``, the per-device
            body run under ``shard_map`` on this rank's shards ([B, n, H, D] and int32[B, n]).
        check: ``(query, key, cp) -> None``; raises ValueError for arrays the strategy cannot
            split.
    """

    local: Callable[[StrategyConfig], Callable[..., Array]]
    check: Callable[[Array, Array, int], None]


def _no_check(query: Array, key: Array, cp: int) -> None:
    del query, key, cp


STRATEGIES: dict[str, Strategy] = {
    "ring": Strategy(ring_local, _no_check),
    "all_gather": Strategy(all_gather_local, _no_check),
    "all_to_all": Strategy(all_to_all_local, check_heads),
}
"""Every strategy by name."""


def check_mesh(mesh: Any, axis_name: Any) -> int:
    """Checks the mesh and the context-parallel axis; returns cp, the axis size.

    Args:
        mesh: a ``jax.sharding.Mesh``.
        axis_name: one of its axis names.

    Returns:
        ``int``, the size of ``axis_name``.

    Raises:
        TypeError: ``mesh`` is not a ``Mesh``.
        ValueError: ``axis_name`` is not an axis of the mesh.

    Example:
        >>> import numpy as np
        >>> check_mesh(Mesh(np.array(jax.devices()[:2]), ("cp",)), "cp")
        2
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name {axis_name!r} is not an axis of the mesh; its axes are {mesh.axis_names}"
        )
    return int(mesh.shape[axis_name])


def _check_split(query: Array, key: Array, cp: int, axis: str) -> None:
    for name, x in (("query", query), ("key", key)):
        if x.shape[1] % cp:
            raise ValueError(
                f"the size of mesh axis {axis!r} (cp={cp}) must divide the sequence length of "
                f"{name}, got T={x.shape[1]}"
            )


def _readable(*arrays: Array) -> bool:
    """Whether this process can read every value: concrete, and (multi-host) fully addressable."""
    return is_concrete(*arrays) and all(getattr(a, "is_fully_addressable", True) for a in arrays)


def _validate_shards(
    layout: tuple[Array, Array], *, cp: int, num_segments: int, mask: MaskType, name: str
) -> None:
    """Validates each rank's shard of a concrete layout (a reordered row is not itself valid)."""
    ids, pos = (np.asarray(a) for a in layout)  # Read on the host, also when jit closes over it.
    split = (ids.shape[0], cp, ids.shape[1] // cp)
    try:
        validate_layout(
            ids.reshape(split),
            pos.reshape(split),
            max_segments_per_seq=num_segments,
            mask_type=mask,
            name=name,
        )
    except ValueError as error:
        raise ValueError(
            f"{error} [row = (batch index, shard index); token counts within the shard of "
            f"{split[2]} tokens]"
        ) from None


@functools.lru_cache(maxsize=64)
def _program(strategy: str, config: StrategyConfig) -> Callable[..., Array]:
    """The jitted, shard-mapped strategy for one static configuration."""
    axis = config.axis_name
    tokens = P(None, axis)
    heads = P(None, axis, None, None)
    mapped = jax.shard_map(
        STRATEGIES[strategy].local(config),
        mesh=config.mesh,
        in_specs=(heads, heads, heads, tokens, tokens, tokens, tokens),
        out_specs=heads,
        # Manual over the context-parallel axis only: other mesh axes (e.g. a sharded batch)
        # stay automatic.
        axis_names=frozenset({axis}),
        # Per-rank variance is not tracked: loop carries inside attention_partial start out
        # rank-invariant. The collectives' transposes are still the right ones (all_gather ->
        # psum_scatter, all_to_all -> all_to_all), and the ring has its own custom_vjp.
        check_vma=False,
    )
    return jax.jit(mapped)


def context_parallel_attention(
    query: Float[ArrayLike, "B T_q H_q D"],
    key: Float[ArrayLike, "B T_kv H_kv D"],
    value: Float[ArrayLike, "B T_kv H_kv D_v"],
    *,
    segment_ids_q: ArrayLike,
    segment_pos_q: ArrayLike,
    segment_ids_kv: ArrayLike | None = None,
    segment_pos_kv: ArrayLike | None = None,
    mask_type: MaskType | str = "padding_causal",
    window_size: tuple[int | None, int | None] | None = None,
    max_segments_per_seq: int,
    mesh: Mesh,
    axis_name: str,
    strategy: StrategyName = "ring",
    scale: float | None = None,
    implementation: LocalImplementation = "blockwise",
) -> Float[Array, "B T_q H_q D_v"]:
    """Attention over packed rows whose sequence axis is sharded over a mesh axis.

    Computes what :func:`thdkit.attention` computes on the same tokens, with the same mask and
    window semantics, keeping T / cp tokens of each input per device. Tokens may be in any order
    that keeps each shard a valid layout: plain, or reordered with
    :func:`thdkit.reorder.striped` / :func:`thdkit.reorder.dual_chunk_swap` (ids and positions
    reordered with the tokens; the output comes back in the same order and sharding).
    Differentiable; the gradients match the single-device attention's. Masks are rebuilt from ids
    and positions after every collective, so every strategy is exact.

    Strategies (docs/context-parallel.md compares them):

    - ``"ring"``: cp - 1 dependent ``ppermute`` steps of the key/value shard (skipping steps
      without work); the backward pass is a second ring. Memory: one visiting k/v shard.
    - ``"all_gather"``: one ``all_gather`` of keys, values, ids and positions; each rank attends
      its query shard to the whole row (blockwise, tile skipping); the backward pass
      reduce-scatters dk, dv. Memory: k/v of the whole row on every device.
    - ``"all_to_all"``: one ``all_to_all`` gives each rank the whole row for H_q / cp query and
      H_kv / cp key/value heads; attention with one plan of the row; one ``all_to_all`` back.
      H_q and H_kv must be multiples of cp. Memory: q/k/v/out of the whole row for H / cp heads.

    Args:
        query: float[B, T_q, H_q, D]; sequence axis sharded over ``axis_name``.
        key: float[B, T_kv, H_kv, D]; H_kv divides H_q (grouped-query attention).
        value: float[B, T_kv, H_kv, D_v].
        segment_ids_q: int[B, T_q]; 0 = padding, 1..S = the document of each query token.
        segment_pos_q: int[B, T_q]; each query token's position inside its document.
        segment_ids_kv, segment_pos_kv: int[B, T_kv], or None for self-attention (kv = q).
        mask_type: a :class:`thdkit.MaskType` or its name.
        window_size: ``(left, right)`` sliding window; None, or None/negative on a side, means
            unbounded on that side.
        max_segments_per_seq: S, a static int >= the largest id.
        mesh: the device mesh; other axes (e.g. one sharding the batch) are left to the
            compiler.
        axis_name: the mesh axis the sequence axis is sharded over; its size cp must divide T_q
            and T_kv.
        strategy: ``"ring"``, ``"all_gather"`` or ``"all_to_all"``.
        scale: multiplier of the logits; default ``1 / sqrt(D)``.
        implementation: the attention each device runs on its part: ``"blockwise"`` or
            ``"pallas"`` (:func:`thdkit.attention`).

    Returns:
        float[B, T_q, H_q, D_v] in the dtype of ``query``; zeros for queries with no allowed key.

    Raises:
        TypeError: non-floating inputs, non-integer ids, a mesh that is not a ``Mesh``.
        ValueError: an unknown strategy or axis, a cp that does not divide T (or, for
            ``"all_to_all"``, H_q or H_kv), mismatched shapes, bad options, or (concrete inputs)
            a shard that breaks a layout rule.

    Example:
        Two documents in a row of eight, striped over two devices. With all logits equal, each
        token averages the values of its document's tokens up to itself:

        >>> import numpy as np
        >>> from thdkit.reorder import striped, unstriped
        >>> mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
        >>> ids = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]])
        >>> pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]])
        >>> qk = jnp.zeros((1, 8, 2, 4))
        >>> v = jnp.broadcast_to(jnp.arange(8.0).reshape(1, 8, 1, 1), (1, 8, 2, 1))
        >>> out = context_parallel_attention(
        ...     qk, qk, striped(v, cp=2, axis=1),
        ...     segment_ids_q=striped(ids, cp=2), segment_pos_q=striped(pos, cp=2),
        ...     max_segments_per_seq=2, mesh=mesh, axis_name="cp", strategy="all_to_all")
        >>> unstriped(out, cp=2, axis=1)[0, :, 0, 0]
        Array([0. , 0.5, 1. , 1.5, 2. , 5. , 5.5, 6. ], dtype=float32)
    """
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {strategy!r}; valid: {', '.join(map(repr, STRATEGIES))}"
        )
    if implementation not in get_args(LocalImplementation):
        raise ValueError(
            f"unknown implementation {implementation!r} for context parallelism; valid: "
            f"{', '.join(map(repr, get_args(LocalImplementation)))}"
        )
    mask = MaskType.parse(mask_type)
    num_segments = check_max_segments(max_segments_per_seq)
    window = check_window(window_size)
    cp = check_mesh(mesh, axis_name)
    query, key, value, scale = check_arguments(query, key, value, scale=scale)
    layout_q, layout_kv = as_layouts(segment_ids_q, segment_pos_q, segment_ids_kv, segment_pos_kv)
    self_attention = layout_kv is None
    check_layout_shapes(query, key, layout_q[0], None if self_attention else layout_kv[0])
    _check_split(query, key, cp, axis_name)
    STRATEGIES[strategy].check(query, key, cp)
    if query.shape[0] == 0:
        return jnp.zeros((*query.shape[:3], value.shape[3]), query.dtype)
    layout_kv = layout_q if self_attention else layout_kv
    for name, layout in (("segment_ids_q", layout_q), ("segment_ids_kv", layout_kv)):
        if _readable(*layout) and not (self_attention and name == "segment_ids_kv"):
            _validate_shards(layout, cp=cp, num_segments=num_segments, mask=mask, name=name)
    config = StrategyConfig(
        mesh, axis_name, mask, window, num_segments, scale, self_attention, implementation
    )
    return _program(strategy, config)(query, key, value, *layout_q, *layout_kv)


class RingOptions(TypedDict, total=False):
    """The keyword arguments of :func:`ring_attention`: those of
    :func:`context_parallel_attention` but ``strategy``, with the same meanings and defaults."""

    segment_ids_q: Required[ArrayLike]
    segment_pos_q: Required[ArrayLike]
    segment_ids_kv: ArrayLike | None
    segment_pos_kv: ArrayLike | None
    mask_type: MaskType | str
    window_size: tuple[int | None, int | None] | None
    max_segments_per_seq: Required[int]
    mesh: Required[Mesh]
    axis_name: Required[str]
    scale: float | None
    implementation: LocalImplementation


def ring_attention(
    query: Float[ArrayLike, "B T_q H_q D"],
    key: Float[ArrayLike, "B T_kv H_kv D"],
    value: Float[ArrayLike, "B T_kv H_kv D_v"],
    **options: Unpack[RingOptions],
) -> Float[Array, "B T_q H_q D_v"]:
    """Ring attention: :func:`context_parallel_attention` with ``strategy="ring"``.

    Args, Returns and Raises as :func:`context_parallel_attention` (without ``strategy``; the
    keyword arguments are typed by :class:`RingOptions`).

    Example:
        Two documents in a row of eight, striped over a ring of two devices. With all logits
        equal, each token averages the values of its document's tokens up to itself:

        >>> import numpy as np
        >>> from thdkit.reorder import striped, unstriped
        >>> mesh = Mesh(np.array(jax.devices()[:2]), ("cp",))
        >>> ids = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]])
        >>> pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]])
        >>> qk = jnp.zeros((1, 8, 1, 4))
        >>> v = jnp.arange(8.0).reshape(1, 8, 1, 1)
        >>> out = ring_attention(
        ...     qk, qk, striped(v, cp=2, axis=1),
        ...     segment_ids_q=striped(ids, cp=2), segment_pos_q=striped(pos, cp=2),
        ...     max_segments_per_seq=2, mesh=mesh, axis_name="cp")
        >>> unstriped(out, cp=2, axis=1)[0, :, 0, 0]
        Array([0. , 0.5, 1. , 1.5, 2. , 5. , 5.5, 6. ], dtype=float32)
    """
    return context_parallel_attention(query, key, value, strategy="ring", **options)
