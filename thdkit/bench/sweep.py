"""What the metadata benchmark runs: ``seqlens_and_offsets`` by method over T, S, masks, layouts.

A cell's random [B, T] layout is seeded by (seed, T, S), so every mask type and method of a (T, S)
sees the same tokens; ``ring`` takes the step of striped cp = ``RING_CP`` with the most allowed
pairs (the first in row-major order on ties). docs/benchmarks.md describes the sweep.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from thdkit._src import reorder, synth
from thdkit._src.limits import MAX_SEQ_LEN
from thdkit.bench.measure import Options, PlanConfig, mask_names
from thdkit.bench.ring import work_per_rank

__all__ = ["MetadataSweep"]

METHODS = ("linear", "one_hot", "dense")
FLOOR = "floor"
LAYOUTS = ("self", "cross", "ring")
RING_CP = 4
_ALL_MASKS = ("padding", "padding_causal", "padding_causal_bottom_right")
PRESETS = {  # What --quick and --full change; options given on the command line win.
    "quick": {
        "seq_lens": (1024, 4096, 16384, 65536),
        "mask_types": ("padding_causal",),
        "warmup": 1,
        "repeats": 10,
        "time_per_program_s": 0.3,
        "memory_limit_bytes": 2**30,
    },
    "default": {},
    "full": {
        "seq_lens": (1024, 4096, 16384, 65536, 131072, 262144, 1048576),
        "max_segments": (16, 1024, 65536),
    },
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetadataSweep(PlanConfig):
    """What the metadata benchmark measures: ``OPTIONS`` documents each option.

    Raises:
        ConfigError: a ``ValueError`` naming the option that is out of range.

    Example:
        >>> MetadataSweep(seq_lens=(64,), mask_types=("causal_padding",)).mask_types
        ('padding_causal',)
    """

    OPTIONS: ClassVar[Options] = {
        **PlanConfig.OPTIONS,
        "max_segments": ("S values (max_segments_per_seq), comma-separated.", 1),
        "mask_types": ("Mask types, comma-separated.", mask_names),
        "methods": ("Methods, comma-separated (the floor always runs).", METHODS),
        "layout": (f"self; cross: T_kv = T; ring: worst step of striped cp={RING_CP}.", LAYOUTS),
        "compile_limit_bytes": (
            "Skip compiling a method whose estimated size is above this, e.g. 64GiB. "
            "\\[default: 8x total memory]",
            1,
        ),
    }
    seq_lens: tuple[int, ...] = (1024, 4096, 16384, 65536, 131072)
    max_segments: tuple[int, ...] = (16,)
    mask_types: tuple[str, ...] = _ALL_MASKS
    methods: tuple[str, ...] = METHODS
    layout: str = "self"
    warmup: int = 2
    repeats: int = 20
    compile_limit_bytes: int | None = None

    def _relations(self) -> list[tuple[str, Callable[[Any], bool], str]]:
        if self.layout != "ring":
            return []
        rule = f"at most {MAX_SEQ_LEN // RING_CP:,} for the ring layout (its rows hold {RING_CP} T)"
        return [("seq_lens", lambda t: t * RING_CP <= MAX_SEQ_LEN, rule)]

    def host_input_bytes(self) -> int:
        """As :meth:`BenchConfig.host_input_bytes`, for the layout's rows: ``RING_CP * T``
        tokens for ``ring``, a q and a kv side for ``cross``."""
        rows = (RING_CP if self.layout == "ring" else 1) * (2 if self.layout == "cross" else 1)
        return rows * super().host_input_bytes()

    def cells(self) -> list[tuple[int, int, str]]:
        """Every (T, S, mask type), T outermost."""
        return list(itertools.product(self.seq_lens, self.max_segments, self.mask_types))


def make_inputs(sweep: MetadataSweep, seq_len: int, max_segments: int, mask_type: str) -> Any:
    """One cell's int32[B, T] arrays (``(ids, pos)``, or q's then kv's), documents per row asked
    of the generator, and ``[q_rank, kv_rank]`` for the ring layout."""
    rng = np.random.default_rng([sweep.seed, seq_len, max_segments])
    row_len = seq_len * (RING_CP if sweep.layout == "ring" else 1)
    segments = min(max_segments, row_len)
    shape = {"batch": sweep.batch, "max_segments": segments}
    if sweep.layout == "cross":
        arrays = synth.cross_segments(rng, seq_len_q=row_len, seq_len_kv=row_len, **shape)
        return arrays, segments, None
    ids, pos = synth.packed_segments(rng, seq_len=row_len, **shape)
    if sweep.layout == "self":
        return (ids, pos), segments, None
    ids, pos = reorder.striped(ids, cp=RING_CP), reorder.striped(pos, cp=RING_CP)
    work = work_per_rank(ids, pos, cp=RING_CP, mask_type=mask_type)  # [q rank, step]
    pairs = {(q, (q - k) % RING_CP): work[q, k] for q in range(RING_CP) for k in range(RING_CP)}
    q_rank, kv_rank = max(sorted(pairs), key=pairs.__getitem__)
    view = reorder.ring_step(ids, pos, cp=RING_CP, q_rank=q_rank, kv_rank=kv_rank)
    return view, segments, [q_rank, kv_rank]
