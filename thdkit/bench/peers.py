"""The peers ``thdkit bench attention`` times next to thdkit: their names, where they run, the
pairs they visit and how each is called on the bench's packed rows.

- ``jax-nn-xla``: ``jax.nn.dot_product_attention`` on the dense mask from ids and positions.
- ``ejkernel-xla``: ejkernel's XLA flash attention on its segment ids (extra ``thdkit[peers]``).
- ``tokamax-xla``, ``tokamax-xla-chunked``: ``tokamax.dot_product_attention`` (implementations
  ``"xla"`` and ``"xla_chunked"``) on the same dense mask as ``jax-nn-xla``: tokamax takes no
  segment ids (extra ``thdkit[tokamax]``, Python >= 3.12).
- ``tokamax-xla-range``: tokamax's ``"xla"`` implementation on its range mask: per query, the
  key range ``[k_start, k_end)`` of its document (with causality on top), so no [T, T] mask is
  an input. tokamax's public function takes no range mask; its ``Mask`` and implementation
  objects are read from its ``_src`` modules, which a tokamax release may move.
- ``jax-nn-cudnn``: plain causal attention over whole rows (no packing): the speed of light.

Each is called as ``fn(q, k, v, ids, pos)`` on float[B, T, H, D] inputs and int32[B, T] ids and
positions of rows of contiguous documents (positions count from 0 in each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from thdkit._src.mask_types import MaskType
from thdkit._src.masks import pair_mask
from thdkit._src.segments import Segments

__all__ = [
    "PEERS",
    "install_hint",
    "peer_backend_reason",
    "peer_program",
    "peer_visited_fraction",
]

PEERS = (
    "jax-nn-xla",
    "ejkernel-xla",
    "tokamax-xla",
    "tokamax-xla-chunked",
    "tokamax-xla-range",
    "jax-nn-cudnn",
)
_BACKENDS = {"jax-nn-cudnn": ("gpu",)}  # Else any.
_TOKAMAX = {"tokamax-xla": "xla", "tokamax-xla-chunked": "xla_chunked"}  # Dense mask input.
_EVERY_PAIR = ("jax-nn-xla", *_TOKAMAX, "tokamax-xla-range")  # Their logits are [B, H, T, T].
_TOKAMAX_INSTALL = 'pip install "thdkit[tokamax]" (Python >= 3.12)'
_INSTALL = {"ejkernel-xla": 'pip install "thdkit[peers]"'}
_INSTALL |= dict.fromkeys((*_TOKAMAX, "tokamax-xla-range"), _TOKAMAX_INSTALL)

Peer = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def peer_backend_reason(name: str, backend: str) -> str | None:
    """Why the peer cannot run on ``backend`` (it needs another), or None.

    Args:
        name: one of :data:`PEERS`.
        backend: a JAX backend name (``"cpu"``, ``"gpu"``, ``"tpu"``).

    Returns:
        The reason, or None where it runs.

    Example:
        >>> peer_backend_reason("jax-nn-cudnn", "cpu"), peer_backend_reason("tokamax-xla", "cpu")
        ('needs a gpu backend', None)
    """
    backends = _BACKENDS.get(name, (backend,))
    return None if backend in backends else f"needs a {' or '.join(backends)} backend"


def install_hint(name: str) -> str:
    """How to install the peer's package (the skip reason of a peer that is not installed).

    Args:
        name: one of :data:`PEERS`.

    Returns:
        A ``pip install`` line; empty for the peers that come with JAX.

    Example:
        >>> install_hint("tokamax-xla")
        'pip install "thdkit[tokamax]" (Python >= 3.12)'
    """
    return _INSTALL.get(name, "")


def peer_visited_fraction(name: str) -> float | None:
    """The pairs the peer visits over B T^2: 1 for those that compute every logit, else None
    (not known).

    Example:
        >>> peer_visited_fraction("tokamax-xla-chunked"), peer_visited_fraction("ejkernel-xla")
        (1.0, None)
    """
    return 1.0 if name in _EVERY_PAIR else None


def _dense(mask: MaskType, window: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    def dense(ids: jax.Array, pos: jax.Array) -> jax.Array:  # bool[B, 1, T, T]
        side = Segments.from_ids(ids, pos)
        return pair_mask(side, side, mask_type=mask, window_size=window)[:, None]

    return dense


def _top_left_only(name: str, mask: MaskType, window: Any) -> None:
    if mask.is_bottom_right or window is not None:
        raise NotImplementedError(f"{name}: top-left masks without a window only")


def peer_program(name: str, mask: MaskType, window: Any) -> Peer:
    """``fn(q, k, v, ids, pos)``: the peer's attention output, float[B, T, H, D] like ``q``.

    Args:
        name: one of :data:`PEERS`.
        mask: a parsed mask type.
        window: ``(left, right)`` or None.

    Returns:
        The function; where the peer cannot run this mask, it raises NotImplementedError when
        traced.

    Raises:
        ImportError: the peer's package is not installed (:func:`install_hint`).
        ValueError: ``name`` is not a peer.

    Example:
        >>> fn = peer_program("jax-nn-xla", MaskType.PADDING_CAUSAL, None)
        >>> ids, pos = jnp.array([[1, 1, 2, 2]]), jnp.array([[0, 1, 0, 1]])
        >>> x = jnp.zeros((1, 4, 1, 1))
        >>> fn(x, x, jnp.arange(4.0).reshape(1, 4, 1, 1), ids, pos)[0, :, 0, 0]
        Array([0. , 0.5, 2. , 2.5], dtype=float32)
    """
    dense = _dense(mask, window)
    if name == "jax-nn-xla":
        return lambda q, k, v, ids, pos: jax.nn.dot_product_attention(
            q, k, v, mask=dense(ids, pos), implementation="xla"
        )
    if name == "jax-nn-cudnn":  # Causal over the whole row: no packing.
        return lambda q, k, v, ids, pos: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
    if name == "ejkernel-xla":
        from ejkernel.modules.operations import flash_attention
        from ejkernel.types import MaskInfo

        def ejkernel(q, k, v, ids, pos):
            _top_left_only(name, mask, window)
            info = MaskInfo.from_segments(ids - 1)  # Its ids start at 0; -1 is padding.
            return flash_attention(q, k, v, mask_info=info, causal=mask.is_causal, platform="xla")

        return ejkernel
    if name in _TOKAMAX:
        import tokamax

        return lambda q, k, v, ids, pos: tokamax.dot_product_attention(
            q, k, v, mask=dense(ids, pos), implementation=_TOKAMAX[name]
        )
    if name == "tokamax-xla-range":
        from tokamax._src.ops.attention import api, base

        def tokamax_range(q, k, v, ids, pos):
            _top_left_only(name, mask, window)
            side = Segments.from_ids(ids, pos)
            index = jax.lax.broadcasted_iota(jnp.int32, ids.shape, ids.ndim - 1)
            start = index - side.positions  # Where each query's document starts.
            ranges = {"k_start": start[:, None]}  # int32[B, 1, T]
            if not mask.is_causal:  # Causal: k <= q ends the range.
                ranges["k_end"] = (start + side.lengths)[:, None]
            ranged = base.Mask(is_causal=mask.is_causal, **ranges)
            with jax.numpy_rank_promotion("allow"):  # Its mask code broadcasts ranks implicitly.
                return api.IMPLEMENTATIONS["xla"](q, k, v, mask=ranged)

        return tokamax_range
    raise ValueError(f"name must be one of {', '.join(PEERS)}, got {name!r}")
