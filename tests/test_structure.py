"""The package's shape: the public surface pinned, a private core that never imports the faces,
imports that flow one way, small modules, and the old module paths kept for one release."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import thdkit
from thdkit._src import moved

PACKAGE = Path(thdkit.__file__).parent
FACES = ("thdkit", "thdkit.kernels", "thdkit.context_parallel", "thdkit.reorder")
EXTRAS = ("thdkit.flax", "thdkit.data")

# The public API. Changing it is a deliberate act: edit this table in the same change, and say
# why in the change's description.
SURFACE = {
    "thdkit": [
        "AttentionPlan", "FlatSeqMeta", "LayoutError", "MAX_POSITION", "MAX_SEGMENTS",
        "MAX_SEQ_LEN", "MaskType", "RowChecks", "Segments", "SeqMeta", "Unpadded", "attention",
        "cache_info", "check_layout", "context_parallel_attention", "dot_product_attention",
        "dot_product_attention_weights", "is_representable", "layout_error_codes",
        "max_programs", "pad", "plan_attention", "reorder", "ring_attention", "ring_schedule",
        "run_lengths", "seqlens_and_offsets", "set_max_programs", "unpad", "validate_layout",
    ],
    "thdkit.kernels": [
        "AttentionConfig", "AttentionPlan", "DEFAULT_BLOCK", "Implementation", "TileRanges",
        "attach_sinks", "attention", "attention_partial", "default_block", "default_order", "get",
        "is_representable", "names", "pair_mask", "pallas_attention", "partial_implementations",
        "plan_attention", "register", "tile_ranges", "unregister",
    ],
    "thdkit.context_parallel": [
        "Call", "STRATEGIES", "Shapes", "Strategy", "StrategyConfig", "StrategyName", "Traffic",
        "collective_bytes", "context_parallel_attention", "get", "names", "register",
        "ring_attention", "ring_schedule", "unregister",
    ],
    "thdkit.reorder": [
        "Balanced", "balance", "dual_chunk_swap", "permute", "ring_step", "shard", "striped",
        "token_work", "undo_dual_chunk_swap", "unpermute", "unstriped",
    ],
    "thdkit.flax": ["PackedSelfAttention", "make_attention_fn", "rope"],
    "thdkit.data": ["SEGMENTS", "pack", "reorder_batch"],
}  # fmt: skip


def _module(name: str):
    if name in EXTRAS:
        pytest.importorskip("flax")
    return importlib.import_module(name)


@pytest.mark.parametrize("name", list(SURFACE))
def test_the_public_surface_is_pinned(name: str) -> None:
    module = _module(name)
    assert sorted(module.__all__) == sorted(SURFACE[name]), (
        f"{name}.__all__ changed: added {sorted(set(module.__all__) - set(SURFACE[name]))}, "
        f"removed {sorted(set(SURFACE[name]) - set(module.__all__))}"
    )
    for public in module.__all__:
        obj = getattr(module, public)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert (obj.__doc__ or "").strip(), f"{name}.{public} has no docstring"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, package: str) -> set[str]:
    """The thdkit modules a file imports, anywhere in it (functions and TYPE_CHECKING too)."""
    modules = _modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            names = [f"{base}.{node.module}" if node.module else base]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("thdkit"):
            names = [node.module]
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("thdkit")]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_every_module_is_small() -> None:
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        assert lines <= 450, f"{name} has {lines} lines"


def test_the_core_never_imports_a_face_or_an_extra() -> None:
    outside = [m for m in _modules() if not m.startswith("thdkit._src")]
    for name, path in _modules().items():
        if not name.startswith("thdkit._src"):
            continue
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        read = _imports(path, package) & set(outside)
        assert not read, f"{name} imports {sorted(read)}: the core imports thdkit._src only"


def test_the_faces_only_re_export() -> None:
    for face in FACES:
        path = _modules()[face]
        for node in ast.parse(path.read_text()).body:
            allowed = (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign)
            assert isinstance(node, allowed), f"{face} defines {type(node).__name__}"


def test_imports_flow_one_way_and_take_no_private_name() -> None:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = _imports(path, package) - {name}
        # A parent package is imported by the import system anyway: not an arrow of ours.
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("thdkit"):
                for alias in node.names:
                    private = alias.name.startswith("_") and alias.name != "__version__"
                    assert not private or f"{node.module}.{alias.name}" in modules, (
                        f"{name} imports {node.module}.{alias.name}"
                    )
    remaining = dict(graph)
    while remaining:
        leaves = {m for m, deps in remaining.items() if not deps & remaining.keys()}
        assert leaves, f"import circle among {sorted(remaining)}"
        remaining = {m: deps for m, deps in remaining.items() if m not in leaves}


@pytest.mark.parametrize("old", sorted(moved.MOVED))
def test_the_old_module_paths_import_for_one_release(old: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} is private since thdkit 0\.2"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(moved.MOVED[old])


def test_importing_the_package_warns_of_nothing_and_opens_every_face() -> None:
    code = (
        "import warnings; warnings.simplefilter('error'); import thdkit; "
        "thdkit.kernels.names(); thdkit.context_parallel.names(); thdkit.reorder.striped"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_names_dropped_from_a_face_warn() -> None:
    import thdkit.kernels

    with pytest.warns(DeprecationWarning, match="check_partial_implementation is no longer"):
        check = thdkit.kernels.check_partial_implementation
    assert check(None) == thdkit.kernels.partial_implementations()[0]
    with warnings.catch_warnings(), pytest.raises(AttributeError, match="no attribute 'nothing'"):
        thdkit.kernels.nothing  # noqa: B018
