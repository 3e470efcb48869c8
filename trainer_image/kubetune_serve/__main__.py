"""`python -m kubetune_serve --model URI ...`: the same as `kubetune serve --model URI ...`."""

import sys

from kubetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
