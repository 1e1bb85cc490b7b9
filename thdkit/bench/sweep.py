"""What the metadata benchmark runs: ``seqlens_and_offsets`` by method, over T, S, masks, layouts.

Axis legend: B batch, T tokens per row (T_q = T_kv = T for every layout), S =
``max_segments_per_seq``.

A *cell* is one (T, S, mask type) of a sweep. Its random [B, T] layout is seeded by (seed, T, S),
so every mask type and method of a (T, S) sees the same tokens: ``self`` =
:func:`thdkit.synth.packed_segments`; ``cross`` = :func:`thdkit.synth.cross_segments` with
T_kv = T; ``ring`` = the worst ring step of a row of ``RING_CP * T`` tokens striped over
``RING_CP`` ranks (stripe 1), each rank holding T tokens: the (q rank, kv rank) pair whose view has
the most allowed (q, kv) pairs under the cell's mask type (counted exactly on the host,
O(T log T)); ties go to the first pair in row-major order. The generator gets
``min(S, row length)`` documents (it needs at least one token each).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import numpy as np

from thdkit import synth
from thdkit.bench.measure import BenchConfig, ConfigError
from thdkit.bench.ring import work_per_rank
from thdkit.masks import MaskType

__all__ = [
    "FLOOR",
    "LAYOUTS",
    "METHODS",
    "PRESETS",
    "RING_CP",
    "Cell",
    "Inputs",
    "MetadataSweep",
    "estimated_bytes",
    "make_inputs",
    "worst_ring_step",
]

Layout = Literal["self", "cross", "ring"]

METHODS: tuple[str, ...] = ("linear", "one_hot", "dense")
FLOOR = "floor"
LAYOUTS: tuple[str, ...] = ("self", "cross", "ring")
RING_CP = 4
# A compile skipped by estimate must be hopeless, not merely too big to run: plans of programs
# somewhat larger than memory are still worth showing (e.g. dense at T = 128k on 24 GiB).
COMPILE_LIMIT_MEMORY_MULTIPLE = 8

_ALL_MASKS = ("padding", "padding_causal", "padding_causal_bottom_right")

PRESETS: dict[str, dict[str, Any]] = {
    # A first look in well under a minute on two CPU cores: all methods, one mask type, and a
    # 1 GiB run budget so that dense at 64k shows the "not run" path instead of taking seconds
    # per call.
    "quick": {
        "seq_lens": (1024, 4096, 16384, 65536),
        "max_segments": (16,),
        "mask_types": ("padding_causal",),
        "warmup": 1,
        "repeats": 10,
        "time_per_program_s": 0.3,
        "memory_limit_bytes": 2**30,
    },
    "default": {
        "seq_lens": (1024, 4096, 16384, 65536, 131072),
        "max_segments": (16,),
        "mask_types": _ALL_MASKS,
        "warmup": 2,
        "repeats": 20,
        "time_per_program_s": 1.0,
        "memory_limit_bytes": None,
    },
    "full": {
        "seq_lens": (1024, 4096, 16384, 65536, 131072, 262144, 1048576),
        "max_segments": (16, 1024, 65536),
        "mask_types": _ALL_MASKS,
        "warmup": 2,
        "repeats": 20,
        "time_per_program_s": 1.0,
        "memory_limit_bytes": None,
    },
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetadataSweep(BenchConfig):
    """What the metadata benchmark measures (the timing fields are :class:`BenchConfig`'s).

    Attributes:
        seq_lens: the T values.
        max_segments: the S values (``max_segments_per_seq``).
        mask_types: mask type names (aliases are replaced by the canonical name).
        methods: methods of ``seqlens_and_offsets`` (the floor is always added).
        layout: "self", "cross" or "ring".
        compile_timeout_s: seconds a compile may take before the method is skipped.
        memory_limit_bytes: run budget; None means half the memory available at each cell.
        compile_limit_bytes: skip compiling a method whose estimate exceeds it; None means
            ``COMPILE_LIMIT_MEMORY_MULTIPLE`` times the device's total memory.

    Example:
        >>> MetadataSweep(seq_lens=(64,), mask_types=("causal_padding",)).mask_types
        ('padding_causal',)
    """

    seq_lens: tuple[int, ...] = PRESETS["default"]["seq_lens"]
    max_segments: tuple[int, ...] = PRESETS["default"]["max_segments"]
    mask_types: tuple[str, ...] = _ALL_MASKS
    methods: tuple[str, ...] = METHODS
    layout: Layout = "self"
    warmup: int = 2
    repeats: int = 20
    compile_timeout_s: float = 60.0
    memory_limit_bytes: int | None = None
    compile_limit_bytes: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._at_least(1, "seq_lens", "max_segments", "memory_limit_bytes", "compile_limit_bytes")
        self._positive("compile_timeout_s")
        self._among("methods", METHODS)
        try:
            canonical = tuple(MaskType.parse(m).value for m in self.mask_types)
        except (ValueError, TypeError) as error:
            raise ConfigError("mask_types", f"must be mask type names: {error}") from None
        if not canonical:
            raise ConfigError("mask_types", "must hold at least one value, got none")
        object.__setattr__(self, "mask_types", canonical)
        if self.layout not in LAYOUTS:
            raise ConfigError("layout", f"must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    def cells(self) -> list[Cell]:
        """Every (T, S, mask type), T outermost, in sweep order."""
        return [
            Cell(seq_len=t, max_segments=s, mask_type=m)
            for t in self.seq_lens
            for s in self.max_segments
            for m in self.mask_types
        ]


class Cell(NamedTuple):
    """One (T, S, mask type) of a sweep."""

    seq_len: int
    max_segments: int
    mask_type: str

    def label(self) -> str:
        """Short text for progress lines, e.g. ``"T=4096 S=16 padding"``."""
        return f"T={self.seq_len} S={self.max_segments} {self.mask_type}"


class Inputs(NamedTuple):
    """The arrays of one cell and how they were drawn.

    Attributes:
        arrays: ``(ids, pos)`` (self) or ``(ids_q, pos_q, ids_kv, pos_kv)``, each int32[B, T].
        segments: documents per row the generator was asked for.
        ring_step: ``(q_rank, kv_rank)`` for the ring layout, else None.
    """

    arrays: tuple[np.ndarray, ...]
    segments: int
    ring_step: tuple[int, int] | None


def worst_ring_step(
    segment_ids: np.ndarray, segment_pos: np.ndarray, *, cp: int, mask_type: MaskType | str
) -> tuple[int, int]:
    """The ring step with the most allowed pairs (ties: first in row-major order).

    Pairs are counted as ring attention sees them (:func:`thdkit.bench.ring.work_per_rank`,
    exact, with whole-document lengths for bottom-right masks).

    Args:
        segment_ids, segment_pos: int[B, T]; an already reordered self-attention layout.
        cp: ranks.
        mask_type: the mask type the pairs are counted under.

    Returns:
        ``(q_rank, kv_rank)``.

    Example:
        >>> ids = synth.striped(np.array([[1, 1, 1, 1, 1, 1, 1, 1]]), cp=2)
        >>> pos = synth.striped(np.array([[0, 1, 2, 3, 4, 5, 6, 7]]), cp=2)
        >>> worst_ring_step(ids, pos, cp=2, mask_type="padding_causal")
        (0, 0)
    """
    work = work_per_rank(segment_ids, segment_pos, cp=cp, mask_type=mask_type)
    pairs = {(q, (q - step) % cp): int(work[q, step]) for q in range(cp) for step in range(cp)}
    return max(sorted(pairs), key=lambda q_kv: pairs[q_kv])


def make_inputs(sweep: MetadataSweep, cell: Cell) -> Inputs:
    """Draws the random layout of one cell (seeded by the sweep's seed, T and S).

    Args:
        sweep: gives the layout, B and the seed.
        cell: gives T, S and the mask type (which picks the worst ring step).

    Returns:
        :class:`Inputs`; every array is int32[B, T].

    Example:
        >>> inputs = make_inputs(MetadataSweep(layout="cross"), Cell(16, 4, "padding"))
        >>> [a.shape for a in inputs.arrays], inputs.segments
        ([(1, 16), (1, 16), (1, 16), (1, 16)], 4)
    """
    rng = np.random.default_rng([sweep.seed, cell.seq_len, cell.max_segments])
    row_len = cell.seq_len * (RING_CP if sweep.layout == "ring" else 1)
    segments = min(cell.max_segments, row_len)
    shape = {"batch": sweep.batch, "max_segments": segments}
    if sweep.layout == "cross":
        arrays = synth.cross_segments(rng, seq_len_q=row_len, seq_len_kv=row_len, **shape)
        return Inputs(arrays, segments, None)
    ids, pos = synth.packed_segments(rng, seq_len=row_len, **shape)
    if sweep.layout == "self":
        return Inputs((ids, pos), segments, None)
    ids, pos = synth.striped(ids, cp=RING_CP), synth.striped(pos, cp=RING_CP)
    q_rank, kv_rank = worst_ring_step(ids, pos, cp=RING_CP, mask_type=cell.mask_type)
    view = synth.ring_step(ids, pos, cp=RING_CP, q_rank=q_rank, kv_rank=kv_rank)
    return Inputs(view, segments, (q_rank, kv_rank))


def estimated_bytes(method: str, *, batch: int, seq_len: int, max_segments: int) -> int:
    """A rough (within ~20 % on XLA:CPU) scratch size, known before compiling.

    dense keeps a bool ``allowed[T, T]``; one_hot compares int32 keys over ``[T, S+1]`` per side;
    linear keeps a few int32 values per token.

    Args:
        method: "linear", "one_hot" or "dense".
        batch: B.
        seq_len: T (= T_q = T_kv).
        max_segments: S.

    Returns:
        bytes.

    Example:
        >>> estimated_bytes("dense", batch=1, seq_len=2**20, max_segments=16) == 2**40
        True
    """
    if method == "dense":
        return batch * seq_len * seq_len
    if method == "one_hot":
        return 4 * batch * 2 * seq_len * (max_segments + 1)
    return 4 * batch * 4 * seq_len
