"""The ``opacus-mi`` console script's entry point.

The CLI imports torch and Opacus (2.5-4 s on a small machine) before its own handler for
Ctrl-C exists: an interrupt then ended in a traceback through the import. Here the import is
made inside a handler that ends it as an interrupt later does: one line, status 130.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("opacus-mi: interrupted", file=sys.stderr)
        return 130
    return cli_main()
