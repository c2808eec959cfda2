"""``python -m plausible``: the command-line interface (see :mod:`plausible.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
