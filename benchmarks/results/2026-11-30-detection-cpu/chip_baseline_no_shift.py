"""The chip-metric baseline on the demo's own sites: the same 600 synthetic sites, splits, epochs and seed as
``make demo``'s rounds, trained without the shift augmentation and without mined chips.

Usage: OMP_NUM_THREADS=1 python chip_baseline_no_shift.py DEMO OUT   (DEMO: a ``make demo`` output folder)
"""

import argparse
import sys
from pathlib import Path

from fusionkern.commands import demo
from fusionkern.data import transforms

_init = transforms.SiteAugment.__init__


def _no_shift(self, *args, **kwargs):
    kwargs["max_shift_px"] = 0
    _init(self, *args, **kwargs)


if __name__ == "__main__":
    demo_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    transforms.SiteAugment.__init__ = _no_shift  # rotations and flips as before, no shift
    args = argparse.Namespace(width=0.25, epochs=12, lr=2e-3, splits=3, seed=0, device="cpu", progress=False)
    demo._train(args, [str(demo_dir / "data")], out / "train", "no shift, no mining")
