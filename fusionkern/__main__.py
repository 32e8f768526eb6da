"""``python -m fusionkern``: the same command line as the ``fusionkern`` console script."""

import sys

from fusionkern.cli import main

if __name__ == "__main__":
    sys.exit(main())
