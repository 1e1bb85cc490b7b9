"""Names and modules that moved in 0.2, kept importable for one release with a DeprecationWarning.

Before 0.2 every module of thdkit was importable and the docs cited some of them
(``thdkit.kernels.partial``, ``thdkit.programs``, ...). Their code now lives in the private
core, ``thdkit._src``; the old dotted paths still import (a finder on ``sys.meta_path`` hands out
the moved module) and warn, naming where the public names are now.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MOVED", "deprecated_attribute", "install"]

_PUBLIC = "its public names are exported by thdkit, thdkit.kernels or thdkit.context_parallel"

MOVED: dict[str, str] = {
    **{
        f"thdkit.{name}": f"thdkit._src.{name}"
        for name in [
            "counting",
            "host",
            "isolation",
            "limits",
            "mask_types",
            "masks",
            "metadata",
            "one_hot",
            "programs",
            "reference",
            "segments",
            "seqmeta",
            "synth",
        ]
    },
    "thdkit.layout": "thdkit._src.validate.rules",
    "thdkit.segment_rules": "thdkit._src.validate.segments",
    "thdkit.inputs": "thdkit._src.validate.inputs",
    "thdkit.dot_product": "thdkit._src.doors.jax_nn",
    "thdkit.jax_nn_layout": "thdkit._src.doors.jax_nn_layout",
    "thdkit.jax_nn_checks": "thdkit._src.doors.jax_nn_checks",
    "thdkit.dense_path": "thdkit._src.doors.jax_nn_dense",
    "thdkit.varlen": "thdkit._src.doors.flash_attn",
    "thdkit.kernels.api": "thdkit._src.doors.keywords",
    "thdkit.kernels.registry": "thdkit._src.kernels.builtins",
    **{
        f"thdkit.kernels.{name}": f"thdkit._src.kernels.{name}"
        for name in [
            "arguments",
            "base",
            "blockwise",
            "config",
            "cudnn",
            "dense",
            "flash_vjp",
            "pallas",
            "pallas_kernels",
            "partial",
            "plan",
            "representable",
            "tiles",
        ]
    },
    "thdkit.context_parallel.registry": "thdkit._src.context_parallel.builtins",
    **{
        f"thdkit.context_parallel.{name}": f"thdkit._src.context_parallel.{name}"
        for name in [
            "all_gather",
            "all_to_all",
            "api",
            "base",
            "program",
            "ring",
            "schedule",
            "shards",
            "traffic",
        ]
    },
}
"""Old module path -> the private module that holds its code now."""


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path of :data:`MOVED` as the moved module, with a DeprecationWarning."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        warnings.warn(
            f"{spec.name} is private since thdkit 0.2 (moved to {MOVED[spec.name]}, which is "
            f"not API); {_PUBLIC}. The old path imports for one more release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the moved module was imported by :meth:`create_module`."""


def install() -> None:
    """Puts the finder of the old paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


def deprecated_attribute(module: str, old: Mapping[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving names dropped from a public module for one release.

    Args:
        module: the public module's name (for the messages).
        old: name -> (the private module that holds it, what to use instead).

    Returns:
        The ``__getattr__``: it warns (DeprecationWarning) and returns the old object, and raises
        AttributeError for any other name.
    """

    def __getattr__(name: str) -> Any:
        if name not in old:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home, instead = old[name]
        warnings.warn(
            f"{module}.{name} is no longer public (use {instead}); it stays for one more release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(home), name)

    return __getattr__
