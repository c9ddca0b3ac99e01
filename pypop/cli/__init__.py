"""The ``pypop`` command: ``pypop serve | passwd | fetch | deliver | import``.

``python -m pypop`` is the same.

Each sub-command is a module with ``add_parser(sub)``, which registers its flags and
its ``run(args) -> exit status``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pypop import __version__
from pypop.cli import deliver, fetch, import_, passwd, serve

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pypop", description="POP3 server framework")
    parser.add_argument("--version", action="version", version=f"pypop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(sub)
    passwd.add_parser(sub)
    fetch.add_parser(sub)
    deliver.add_parser(sub)
    import_.add_parser(sub)
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
