"""How the benchmarks' reports write sizes, token counts and the device they ran on."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["device_name", "format_bytes", "format_tokens"]


def format_bytes(num_bytes: float | None) -> str:
    """A binary size such as ``"16.0 GiB"`` or ``"512 B"``; ``"-"`` for None.

    Example:
        >>> [format_bytes(n) for n in (None, 512, 3 * 2**30)]
        ['-', '512 B', '3.0 GiB']
    """
    if num_bytes is None:
        return "-"
    power = 0 if num_bytes < 1024 else min(int(math.log(num_bytes, 1024)), 5)
    return f"{num_bytes / 1024**power:.1f} {' KMGTP'[power]}iB" if power else f"{num_bytes:.0f} B"


def format_tokens(count: int) -> str:
    """A token count as the reports show it: ``1k``, ``128k``, ``1M`` (k = 1,024), else ``1,000``.

    Example:
        >>> [format_tokens(t) for t in (1024, 131072, 2**20, 1000)]
        ['1k', '128k', '1M', '1,000']
    """
    if count and count % 2**20 == 0:
        return f"{count // 2**20}M"
    return f"{count // 1024}k" if count and count % 1024 == 0 else f"{count:,}"


def device_name(environment: Mapping[str, Any]) -> str:
    """The backend and, where it says more, the device kind: ``cpu``, ``gpu (NVIDIA H100)``.

    Example:
        >>> device_name({"backend": "cpu", "device_kind": "cpu"})
        'cpu'
        >>> device_name({"backend": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"})
        'gpu (NVIDIA H100 80GB HBM3)'
    """
    backend, kind = environment["backend"], str(environment["device_kind"])
    return backend if kind.lower() == backend.lower() else f"{backend} ({kind})"
