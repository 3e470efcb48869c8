"""`python -m kubetune_trainer.serving --model URI ...`: the same as `kubetune serve --model URI ...`."""

import sys

from kubetune_operator.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
