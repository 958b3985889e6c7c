"""``python -m torchfree``: the torchfree command line (see torchfree.cli)."""

import sys

from torchfree.cli import main

if __name__ == "__main__":
    sys.exit(main())
