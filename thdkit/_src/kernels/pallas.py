"""The Pallas method: flash-attention kernels that visit only the key tiles of the tile ranges.

Axis legend: B batch, T_q / T_kv query and key/value lengths, H_q / H_kv heads (G = H_q / H_kv
query heads per key/value head), D / D_v head dims, NQ / NK query / key tiles per row.

Three kernels (:mod:`thdkit._src.kernels.pallas_kernels`), each on a grid of independent programs
(no state carried between programs, as Triton needs):

- forward: grid ``(B * NQ, H_q)``; program (b·NQ + r, h) holds query tile r of row b, head h, and
  loops over exactly the key tiles ``ranges.lo[b, r] .. ranges.hi[b, r]`` of the plan's
  :class:`thdkit.kernels.TileRanges` (online softmax). Query heads are a grid axis: dots stay
  2-D (Triton), programs stay small (registers) and many (occupancy); the G heads of a group read
  the same key tiles one after another, from cache;
- dq: the same grid and loop, recomputing each tile's weights from the saved row maxima and
  sums (exact at a row's largest logit: :mod:`thdkit._src.kernels.flash_vjp`);
- dk/dv: grid ``(B * NK, H_kv)``; program (b·NK + c, j) holds key tile c of key/value head j and
  loops over the query tiles that visit it (:func:`visiting_query_tiles`, O(NQ + NK)) and, per
  query tile, over the G query heads of its group: dk and dv sum over those heads, so they are
  accumulated in the kernel rather than written per query head and reduced afterwards.

Inside a tile the mask is rebuilt from ids, positions and document lengths
(:func:`thdkit.kernels.pair_mask`), so the result is exact for every valid layout, ring steps
included, and every masked product is a select. Logits and accumulators are float32; the matmul
operands keep the input dtype (bfloat16/float16 weights are rounded to it before the weighted
sums, as flash attention does). A soft cap is the blockwise method's: each tile's capped logits
``cap * tanh(scale * dot / cap)`` in float32 before the mask, the online softmax over them, and
``scale * (1 - (capped / cap)^2)`` as the derivative of the logit in the backward kernels.

The tile ranges reach the kernels as inputs on GPU (Triton) and through scalar prefetch
(``PrefetchScalarGridSpec``, SMEM) on TPU; in both the kernels read ``lo_ref[program]``. On CPU
the kernels run in Pallas interpret mode (slow: for tests). Isolation of non-finite values is the
blockwise method's: inputs sanitised once (:func:`thdkit._src.isolation.sanitize`), each tile
records whether an allowed key or value was non-finite, such rows come out NaN and pass no
gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from thdkit._src.isolation import sanitize
from thdkit._src.kernels.blockwise import Blockwise
from thdkit._src.kernels.config import AttentionConfig, check_soft_cap
from thdkit._src.kernels.flash_vjp import flash_vjp, varying_axes
from thdkit._src.kernels.pallas_kernels import KernelConfig, run_dkv, run_dq, run_forward
from thdkit._src.kernels.tiles import TileRanges, pad_tokens
from thdkit._src.mask_types import MaskType, Window
from thdkit._src.segments import Segments

__all__ = [
    "Pallas",
    "pallas_attention",
    "visiting_query_tiles",
]

_BACKENDS = ("cpu", "gpu", "tpu")
# Triton: every loaded block has a power-of-two size and dots need dims >= 16.
_TRITON_MIN = 16
_TRITON_MAX_HEAD_DIM = 256
# TPU: the kernels hold a whole key/value (or query) row of one head in VMEM, double-buffered.
_TPU_VMEM_BUDGET = 16 * 2**20
_TPU_LANES = 128


# --- Tile bookkeeping ------------------------------------------------------------------------


def visiting_query_tiles(ranges: TileRanges) -> tuple[Int[Array, "B NK"], Int[Array, "B NK"]]:
    """Per key tile, a contiguous range ``[lo, hi)`` of query tiles holding every visitor.

    Query tile r visits key tile c iff ``ranges.lo[b, r] <= c < ranges.hi[b, r]``. The range of c
    runs from the smallest visiting-capable r (one whose ``hi > c``) to the largest (one whose
    ``lo <= c``): a superset of the visitors for any ranges, and exactly their span where ``lo``
    and ``hi`` never decrease along a row (as :func:`thdkit.kernels.tile_ranges` makes them).
    One scatter of NQ values into NK bins and one running min / max: O(NQ + NK) per row.

    Args:
        ranges: :class:`thdkit.kernels.TileRanges` with int32[B, NQ] ``lo`` and ``hi``.

    Returns:
        ``(lo, hi)``: int32[B, NK] each, query tile indices; ``lo == hi == 0`` where no query tile
        visits the key tile.

    Example:
        >>> ranges = TileRanges(lo=jnp.array([[0, 0, 2, 0]]), hi=jnp.array([[1, 2, 3, 0]]),
        ...                     num_kv_tiles=4, block_q=2, block_kv=2)
        >>> lo, hi = visiting_query_tiles(ranges)
        >>> lo.tolist(), hi.tolist()
        ([[0, 1, 2, 0]], [[2, 2, 3, 0]])
    """
    lo, hi = ranges.lo, ranges.hi
    batch, num_q = lo.shape
    num_kv = ranges.num_kv_tiles
    visits = hi > lo
    rows = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], lo.shape)
    tile = jnp.broadcast_to(jnp.arange(num_q, dtype=jnp.int32)[None, :], lo.shape)
    # Bin num_kv is out of range: the scatter drops the tiles that visit nothing.
    last = jnp.where(visits, hi - 1, num_kv)
    first = jnp.where(visits, lo, num_kv)
    smallest = jnp.full((batch, num_kv), num_q, jnp.int32).at[rows, last].min(tile, mode="drop")
    largest = jnp.zeros((batch, num_kv), jnp.int32).at[rows, first].max(tile + 1, mode="drop")
    q_lo = jax.lax.cummin(smallest, axis=1, reverse=True)  # min r with hi[r] > c
    q_hi = jax.lax.cummax(largest, axis=1)  # max r + 1 with lo[r] <= c
    some = q_hi > q_lo
    return jnp.where(some, q_lo, 0), jnp.where(some, q_hi, 0)


# --- Custom VJP ------------------------------------------------------------------------------


def _forward(config: KernelConfig, q, k, v, layout, bad_q, bad_kv, lo, hi):
    """The forward kernel, its statistics ``[B, H_q, 1, T]`` as rows ``[B, H_q, T]`` of out."""
    out, lse, poisoned, row_max, row_sum = run_forward(
        config, q, k, v, layout, bad_q, bad_kv, lo, hi
    )
    return out, lse[:, :, 0], poisoned[:, :, 0] > 0, (row_max[:, :, 0], row_sum[:, :, 0])


def _backward(config: KernelConfig, inputs, d_out, row_term, row_max, row_sum):
    """The dq and dk/dv kernels (:mod:`~.flash_vjp`), weights from the forward's row maxima and
    sums."""
    q, k, v, layout, _, _, lo, hi = inputs
    row_term = row_term[:, :, None]
    stats = (row_max[:, :, None], 1.0 / row_sum[:, :, None])
    d_out = d_out.astype(q.dtype)
    dq = run_dq(config, q, k, v, layout, d_out, stats, row_term, lo, hi)
    ranges = TileRanges(
        lo=lo.reshape(-1, config.num_q),
        hi=hi.reshape(-1, config.num_q),
        num_kv_tiles=config.num_kv,
        block_q=config.block_q,
        block_kv=config.block_kv,
    )
    q_lo, q_hi = visiting_query_tiles(ranges)
    dk, dv = run_dkv(
        config, q, k, v, layout, d_out, stats, row_term, q_lo.reshape(-1), q_hi.reshape(-1)
    )
    return dq, dk, dv


_flash = flash_vjp(_forward, _backward)


# --- Entry points ----------------------------------------------------------------------------


def _backend_problem(backend: str) -> str | None:
    if backend not in _BACKENDS:
        return f"runs on CPU (interpret mode), GPU (Triton) or TPU (Mosaic), not on {backend}"
    return None


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check_compiled_tiles(backend: str, ranges: TileRanges, seq_q: int) -> None:
    """NotImplementedError where the compiled kernels cannot take the plan's tile sizes."""
    blocks = dict(block_q=ranges.block_q, block_kv=ranges.block_kv)
    if backend == "gpu":
        wrong = {k: b for k, b in blocks.items() if b < _TRITON_MIN or b & (b - 1)}
        if wrong:
            raise NotImplementedError(
                f"on GPU (Triton) needs tile sizes that are powers of two >= {_TRITON_MIN} "
                f"(after capping to T), got {wrong}; plan with such block_q/block_kv"
            )
    if backend == "tpu":
        tiles = dict(block_q=-(-seq_q // ranges.block_q), block_kv=ranges.num_kv_tiles)
        wrong = {k: b for k, b in blocks.items() if b % _TPU_LANES and tiles[k] > 1}
        if wrong:
            raise NotImplementedError(
                f"on TPU needs tile sizes that are multiples of {_TPU_LANES} (or one tile per "
                f"row), got {wrong}"
            )


def pallas_attention(
    query: Float[Array, "B T_q H_q D"],
    key: Float[Array, "B T_kv H_kv D"],
    value: Float[Array, "B T_kv H_kv D_v"],
    q_segments: Segments,
    kv_segments: Segments,
    ranges: TileRanges,
    *,
    mask_type: MaskType,
    window_size: Window,
    scale: float,
    logits_soft_cap: float | None = None,
    interpret: Any = None,
    backend: str | None = None,
) -> tuple[Float[Array, "B T_q H_q D_v"], Float[Array, "B T_q H_q"]]:
    """Flash attention in Pallas kernels over precomputed tile ranges: ``(out, lse)``.

    The same function as ``blockwise_attention`` (same
    semantics, isolation of non-finite values and return values), computed by the kernels of
    this module. Differentiable with respect to query, key and value (custom VJP: a dq kernel
    and a dk/dv kernel), including through ``lse``. Nothing of the layout is recomputed; the
    tile sizes are read off ``ranges``.

    Args:
        query: float32/bfloat16/float16[B, T_q, H_q, D].
        key: [B, T_kv, H_kv, D], the query's dtype; ``H_q`` a multiple of ``H_kv``.
        value: [B, T_kv, H_kv, D_v], the query's dtype.
        q_segments: the queries' :class:`thdkit.Segments`, int32[B, T_q] fields (``lengths`` as
            the bottom-right rule reads them: run lengths, or global document lengths in a
            context-parallel shard).
        kv_segments: the keys'/values', int32[B, T_kv] fields.
        ranges: :class:`thdkit.kernels.TileRanges` of this layout (``tile_ranges``).
        mask_type: a parsed ``MaskType``.
        window_size: a parsed window (``check_window``).
        scale: multiplies the logits.
        logits_soft_cap: ``cap`` of ``cap * tanh(logit / cap)``, applied (in float32) after the
            scale and before the mask (docs/semantics.md, "Soft-capped logits"), or None for
            none; a positive finite float.
        interpret: True runs the kernels in Pallas interpret mode, False compiles them; None
            means interpret mode exactly when ``backend`` is ``"cpu"`` (the only mode there). A
            Pallas interpret-params object (``pltpu.InterpretParams()``, which emulates TPU
            memory spaces on CPU) is passed on to ``pallas_call`` as it is. Inside
            ``jax.shard_map`` with ``check_vma=True``, on arrays that vary over its mesh axes,
            True runs the TPU path in that interpreter (Pallas's plain interpreter cannot
            evaluate kernels on such arrays).
        backend: the platform whose kernels to build: ``"gpu"`` (tile ranges as kernel inputs;
            compiled by Triton), ``"tpu"`` (tile ranges through scalar prefetch; compiled by
            Mosaic) or ``"cpu"`` (the GPU kernels, interpreted); None means
            ``jax.default_backend()``. Another platform than the default one serves
            ``jax.export`` to that platform, or its interpreter (``"tpu"`` with
            ``interpret=pltpu.InterpretParams()``).

    Returns:
        ``(out, lse)``: float32[B, T_q, H_q, D_v], normalised over the allowed keys (zeros where
        none is); float32[B, T_q, H_q], their log-sum-exp (-inf where none is). Rows that read a
        non-finite query, key or value element are NaN in both.

    Raises:
        ValueError: ``ranges`` that do not fit the arrays (tile counts, batch size), an unknown
            ``backend``, a ``logits_soft_cap`` that is not positive and finite.
        TypeError: a ``logits_soft_cap`` that is not a real number.
        NotImplementedError: compiled (not interpret) on CPU, or tile sizes the compiled
            kernels cannot take (GPU: powers of two >= 16; TPU: multiples of 128 or one tile
            per row).

    Example:
        >>> from thdkit.kernels import tile_ranges
        >>> side = Segments.from_ids(jnp.array([[1, 1, 2, 2]]))
        >>> ranges = tile_ranges(side, side, mask_type=MaskType.CAUSAL, window_size=None,
        ...                      block_q=2, block_kv=2)
        >>> v = jnp.arange(4.0).reshape(1, 4, 1, 1)
        >>> out, lse = pallas_attention(jnp.zeros((1, 4, 1, 1)), jnp.zeros((1, 4, 1, 1)), v,
        ...     side, side, ranges, mask_type=MaskType.CAUSAL, window_size=None, scale=1.0)
        >>> out[0, :, 0, 0]
        Array([0. , 0.5, 2. , 2.5], dtype=float32)
        >>> jnp.exp(lse[0, :, 0])
        Array([1., 2., 1., 2.], dtype=float32)

        A soft cap of 2 bounds the logits: ``2 * tanh(5)`` for a dot product of 10, not 10.

        >>> q = k = jnp.ones((1, 4, 1, 1))
        >>> _, lse = pallas_attention(q, 10 * k, v, side, side, ranges,
        ...     mask_type=MaskType.CAUSAL, window_size=None, scale=1.0, logits_soft_cap=2.0)
        >>> [round(x, 4) for x in lse[0, :2, 0].tolist()]  # 2 tanh(5), + log(2) for two keys
        [1.9998, 2.693]
    """
    if backend is None:
        backend = jax.default_backend()
    elif backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)} or None, got {backend!r}")
    cap = check_soft_cap(logits_soft_cap)
    if interpret is None:
        interpret = backend == "cpu"
    if interpret is True and varying_axes(query, key, value, q_segments, kv_segments, ranges):
        # Inside a jax.shard_map with check_vma=True: Pallas's HLO interpreter cannot evaluate
        # a kernel on arrays that vary over mesh axes; its TPU interpreter can.
        from jax.experimental.pallas import tpu as pltpu

        interpret, backend = pltpu.InterpretParams(), "tpu"
    interpreting = interpret is not False
    batch, seq_q, heads_q, dim = query.shape
    _, seq_kv, heads_kv, dim_v = value.shape
    block_q, block_kv = ranges.block_q, ranges.block_kv
    num_q, num_kv = -(-seq_q // block_q), -(-seq_kv // block_kv)
    if ranges.lo.shape != (batch, num_q) or ranges.num_kv_tiles != num_kv:
        raise ValueError(
            f"ranges (lo {ranges.lo.shape}, {ranges.num_kv_tiles} key tiles of {block_kv}) do "
            f"not fit B={batch}, T_q={seq_q} in tiles of {block_q} and T_kv={seq_kv}: expected "
            f"lo {(batch, num_q)} and {num_kv} key tiles"
        )
    if not interpreting:
        if backend == "cpu":
            raise NotImplementedError(
                "pallas attention runs compiled on GPU or TPU only; on CPU use interpret mode"
            )
        _check_compiled_tiles(backend, ranges, seq_q)
    if batch == 0:
        return (
            jnp.zeros((0, seq_q, heads_q, dim_v), jnp.float32),
            jnp.zeros((0, seq_q, heads_q), jnp.float32),
        )
    # Triton loads power-of-two blocks: zero columns leave q . k unchanged and are cut off.
    padded_dim, padded_dim_v = dim, dim_v
    if backend == "gpu" and not interpreting:
        padded_dim = _next_power_of_two(max(dim, _TRITON_MIN))
        padded_dim_v = _next_power_of_two(max(dim_v, _TRITON_MIN))
    (query, bad_q), (key, bad_k), (value, bad_v) = (sanitize(x) for x in (query, key, value))

    def head_major(x: Array, length: int, width: int) -> Array:
        """[B, T, H, d] -> [B, H, length, width], zeros appended."""
        x = jnp.pad(pad_tokens(x, length), ((0, 0), (0, 0), (0, 0), (0, width - x.shape[-1])))
        return x.transpose(0, 2, 1, 3)

    def flags(bad: Array, length: int) -> Array:
        """bool[B, T, H] -> float32[B, H, 1, length], 1 where non-finite."""
        return pad_tokens(bad, length).transpose(0, 2, 1)[:, :, None, :].astype(jnp.float32)

    def rows(side: Segments, length: int) -> Array:
        """int32[B, 3, length]: ids, positions and lengths, padding (zeros) appended."""
        fields = (side.ids, side.positions, side.lengths)
        return pad_tokens(jnp.stack(fields, axis=-1).astype(jnp.int32), length).transpose(0, 2, 1)

    seq_q_pad, seq_kv_pad = num_q * block_q, num_kv * block_kv
    config = KernelConfig(
        mask=mask_type,
        window=window_size,
        scale=float(scale),
        block_q=block_q,
        block_kv=block_kv,
        num_q=num_q,
        num_kv=num_kv,
        groups=heads_q // heads_kv,
        interpret=interpret,
        backend=backend,
        cap=cap,
    )
    out, lse = _flash(
        config,
        head_major(query, seq_q_pad, padded_dim),
        head_major(key, seq_kv_pad, padded_dim),
        head_major(value, seq_kv_pad, padded_dim_v),
        (rows(q_segments, seq_q_pad), rows(kv_segments, seq_kv_pad)),
        flags(bad_q, seq_q_pad),
        flags(bad_k | bad_v, seq_kv_pad),
        ranges.lo.reshape(-1).astype(jnp.int32),
        ranges.hi.reshape(-1).astype(jnp.int32),
    )
    out = out.transpose(0, 2, 1, 3)[:, :seq_q, :, :dim_v]
    lse = lse[:, :, :seq_q].transpose(0, 2, 1)
    return out, lse


class Pallas(Blockwise):
    """Flash-attention kernels over the tile ranges: Triton on GPU, Mosaic on TPU, interpret
    mode on CPU (slow: for tests). Every mask type, window and cross-attention, soft-capped
    logits; not in the default order. Its auxiliary data is the blockwise method's: the layout's
    tile ranges.
    """

    name = "pallas"
    # Declared here, not inherited from blockwise: each feature where the kernels implement it.
    features = frozenset({"logits_soft_cap"})
    interpreted_on = ("cpu",)

    def check_config(self, config: AttentionConfig) -> None:
        """Raises NotImplementedError where the backend has no Pallas kernels."""
        problem = _backend_problem(jax.default_backend())
        if problem:
            raise NotImplementedError(problem)

    def check_arrays(self, query: Array, key: Array, value: Array) -> None:
        """Raises NotImplementedError where the kernels cannot take these arrays on this backend.

        CPU (interpret mode) takes every checked input. GPU (Triton): head dims up to 256 (padded
        to a power of two >= 16 inside). TPU: bfloat16 or float32, and one head's key and value
        rows (and a group's query rows) must fit in VMEM, double-buffered.

        Args:
            query, key, value: the checked attention inputs, [B, T, H, D] / [B, T, H, D_v].

        Raises:
            NotImplementedError: the reason these arrays cannot run here.

        Example:
            >>> x = jnp.zeros((1, 8, 2, 16))
            >>> Pallas().check_arrays(x, x, x)
        """
        backend = jax.default_backend()
        problem = _backend_problem(backend)
        if problem:
            raise NotImplementedError(problem)
        dims = (query.shape[-1], value.shape[-1])
        if backend == "gpu" and max(dims) > _TRITON_MAX_HEAD_DIM:
            raise NotImplementedError(
                f"on GPU needs head dims of at most {_TRITON_MAX_HEAD_DIM}, got D, D_v = {dims}"
            )
        if backend == "tpu":
            if query.dtype == jnp.float16:
                raise NotImplementedError("on TPU takes bfloat16 or float32, not float16")
            groups = query.shape[2] // key.shape[2]
            # The longest row a kernel holds (keys, or a group's queries in the dk/dv kernel), its
            # vectors plus 16 bytes per token of layout and flags, double-buffered.
            rows = max(key.shape[1], groups * query.shape[1])
            needed = 2 * rows * (sum(dims) * query.dtype.itemsize + 16)
            if needed > _TPU_VMEM_BUDGET:
                raise NotImplementedError(
                    f"on TPU holds one head's rows in VMEM: {needed} bytes for "
                    f"T_kv={key.shape[1]}, G*T_q={groups * query.shape[1]}, "
                    f"D + D_v={sum(dims)} exceed {_TPU_VMEM_BUDGET}"
                )

    def forward(self, query, key, value, q, kv, aux, config, *, scale):
        return pallas_attention(
            query,
            key,
            value,
            q,
            kv,
            aux,
            mask_type=config.mask_type,
            window_size=config.window_size,
            scale=scale,
            logits_soft_cap=config.logits_soft_cap,
        )
