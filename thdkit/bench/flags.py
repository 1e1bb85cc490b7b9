"""One option name per idea across the ``thdkit bench`` subcommands, and how option values parse.

Field ``x_y`` (or ``x_y_s``) of a benchmark config is the flag ``--x-y`` unless :data:`FLAGS`
names it otherwise; it takes a comma-separated list where the benchmark sweeps it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import typer

__all__ = [
    "FLAGS",
    "flag_name",
    "one_value",
    "parse_size",
    "swept_flags",
    "value_parser",
    "with_default",
]


def parse_size(text: str) -> int:
    """An int with an optional binary suffix: ``4096``, ``128k``, ``1M``, ``2GiB``."""
    match = re.fullmatch(r"\s*([+-]?\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise typer.BadParameter(f"expected an integer such as 4096, 128k or 1M, got {text!r}")
    return int(match[1]) * 1024 ** " kmgt".index(match[2] or " ")


_CHOICES_SHOWN = 24  # The longest "a|b|c" metavar; past it the help text lists the names.


def value_parser(kind: str, field: str = "", rule: Any = None) -> tuple[Callable[[str], Any], str]:
    """How the option of field ``field`` (of type ``kind``, checked by ``rule``) reads its text,
    and the metavar that says what it accepts: ``INT`` (k/M/G suffixes ok), ``BYTES`` for a
    ``*_bytes`` field (e.g. 10GiB), ``SECONDS`` for a ``*_s`` field, ``a|b|c`` for a name among
    a few (``rule``), else ``NAME``; a tuple is comma-separated, ``X,...``.

    Example:
        >>> parse, metavar = value_parser("tuple[int, ...]", "seq_lens")
        >>> parse("1k, 4096"), metavar
        ((1024, 4096), 'INT,...')
        >>> value_parser("int | None", "memory_limit_bytes")[1]
        'BYTES'
    """
    kind = kind.removesuffix(" | None")
    if kind.startswith("tuple["):
        one, name = value_parser(kind[6:-6], field.removesuffix("s"))

        def parse_list(text: str) -> tuple[Any, ...]:
            return tuple(one(part.strip()) for part in text.split(",") if part.strip())

        return parse_list, name + ",..."
    if kind == "int":
        return parse_size, "BYTES" if field.endswith("_bytes") else "INT"
    if kind == "float":
        return float, "SECONDS" if field.endswith("_s") else "FLOAT"
    choices = "|".join(rule) if isinstance(rule, tuple) else ""
    return str, choices if 0 < len(choices) <= _CHOICES_SHOWN else "NAME"


FLAGS = {
    "batch": "--batch-size",  # B, as thdkit.data.pack's batch_size and the example's option
    "seq_lens": "--seq-len",  # T, one or several
    "max_segments": "--segments",  # documents per row, n: ids 1..n, and S = n
    "cps": "--cp",  # context-parallel ranks, one or several
    "stripe_sizes": "--stripe-size",
    "mask_types": "--mask-type",
    "methods": "--method",
    "implementations": "--implementation",
    "logits_soft_cap": "--soft-cap",  # the cap of cap * tanh(logit / cap); its value is the CAP
}
"""The config fields whose option is not ``--`` + the field's name (hyphens, no ``_s``): the
plural fields of the benchmarks that sweep an idea, and ``batch``, so that each idea has one
option name in every subcommand (and in ``examples/train_packed_lm.py``); ``logits_soft_cap``,
``thdkit.attention``'s keyword, is ``--soft-cap`` on the command line."""


def flag_name(field: str) -> str:
    return FLAGS.get(field, "--" + field.removesuffix("_s").replace("_", "-"))


def swept_flags(configs: tuple[type, ...]) -> frozenset[str]:
    """The options that take a list in at least one of these benchmark configs."""
    return frozenset(
        flag_name(field.name)
        for cls in configs
        for field in dataclasses.fields(cls)
        if str(field.type).removesuffix(" | None").startswith("tuple[")
    )


def one_value(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, refusing a list: for an option that other subcommands sweep."""

    def one(text: str) -> Any:
        if "," in text:
            raise typer.BadParameter(f"this benchmark takes one value, got {text!r}")
        return parse(text)

    return one


def with_default(help_text: str, shown: Any) -> str:
    """The help text ending in ``[default: ...]`` (kept where the text already says it)."""
    if "[default:" in help_text:
        return help_text
    return f"{help_text} \\[default: {shown}]"
