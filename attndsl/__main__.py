"""``python -m attndsl``: the command-line tool (see :mod:`attndsl.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
