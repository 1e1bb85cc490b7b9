"""Entry point of the ``thdkit`` command (``python -m thdkit.cli bench --quick`` is the same).

The command needs the optional extra ``thdkit[bench]``; without it the command says so in one
line and exits with status 2. The library never imports typer, rich or matplotlib.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Runs the ``thdkit`` command, or says in one line how to install what it needs.

    Raises:
        SystemExit: always, with the command's exit status (2 without the ``bench`` extra).
    """
    try:
        from thdkit.bench.commands import main as run
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in ("typer", "rich", "matplotlib"):
            raise
        print(
            f"thdkit: the command line needs the optional dependencies ({error.name} is missing): "
            'pip install "thdkit[bench]"',
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    run()


if __name__ == "__main__":
    main()
