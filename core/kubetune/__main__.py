"""`python -m kubetune ...` is the `kubetune` command (torchrun starts its workers this way)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
