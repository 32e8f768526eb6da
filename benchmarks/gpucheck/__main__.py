"""``python -m gpucheck``: see :mod:`gpucheck.main`."""

import sys

from gpucheck.main import main

sys.exit(main())
