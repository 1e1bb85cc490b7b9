"""The optional extras of pyproject.toml: ``[dev]`` (what the tests and the lint need) installs
next to the user's jax, whatever its version; the peers, whose release pins an old jax, stay in
their own extra ``[peers]``, installed only where that jax is wanted (.ci/run's Python 3.11 leg).
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
JAX = {"jax", "jaxlib"}
_UPPER = {"<", "<=", "==", "===", "~="}  # Operators that bound a version from above.


def _name(requirement: Requirement) -> str:
    return requirement.name.lower().replace("_", "-")


def _closure(extra: str) -> tuple[set[str], list[Requirement]]:
    """The extras ``extra`` includes (itself too, through ``thdkit[...]``), and their
    requirements on other packages."""
    seen, pending, requirements = set(), [extra], []
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in EXTRAS[name]:
            requirement = Requirement(text)
            if _name(requirement) == PROJECT["name"]:
                pending.extend(requirement.extras)
            else:
                requirements.append(requirement)
    return seen, requirements


def _caps_jax(requirement: Requirement) -> bool:
    return _name(requirement) in JAX and any(s.operator in _UPPER for s in requirement.specifier)


def test_closure_follows_self_references():
    extras, requirements = _closure("dev")
    assert {"dev", "bench", "flax"} <= extras
    assert {"typer", "pytest", "flax", "ruff"} <= {_name(r) for r in requirements}
    assert _caps_jax(Requirement("jax~=0.10.0")) and _caps_jax(Requirement("jaxlib<0.11"))
    assert not _caps_jax(Requirement("jax>=0.7.0")) and not _caps_jax(Requirement("jax!=0.9"))


def test_dev_never_pins_or_caps_jax():
    """``pip install -e ".[dev]"`` (the README's first command) keeps the newest jax."""
    extras, requirements = _closure("dev")
    assert "peers" not in extras, "[dev] includes [peers], whose release pins jax 0.10.x"
    peers = {_name(Requirement(text)) for text in EXTRAS["peers"]}
    assert not peers & {_name(r) for r in requirements}, "[dev] names a peer directly"
    capped = [str(r) for r in requirements + [Requirement(d) for d in PROJECT["dependencies"]]]
    assert not [r for r in capped if _caps_jax(Requirement(r))], capped


def test_the_peers_extra_is_the_only_one_that_pins_jax():
    """Installed packages that an extra names: only those of ``[peers]`` may cap jax."""
    for extra in EXTRAS:
        for requirement in _closure(extra)[1]:
            try:
                needs = importlib.metadata.requires(requirement.name) or []
            except importlib.metadata.PackageNotFoundError:
                continue  # Not installed here (the peers on the newest jax): nothing to read.
            pins = [
                text
                for text in needs
                if _caps_jax(needed := Requirement(text))
                and (needed.marker is None or needed.marker.evaluate({"extra": ""}))
            ]
            in_peers = "peers" in _closure(extra)[0]
            assert in_peers or not pins, f"[{extra}] needs {requirement}, which pins {pins}"
