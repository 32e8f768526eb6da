"""Where the verifier's time goes: reading re-centred chips from the rasters against the ensemble's forward passes.

Takes a finished scan folder (its rasters, grid and verifier checkpoints from scan.json), reads 161 chips centred on
points drawn uniformly over the region (as many as the candidates of the region-11 scan it was run on) and scores
them as the verifier does (every checkpoint, four quarter turns).

Usage: OMP_NUM_THREADS=1 python verifier_profile.py SCAN_DEMO_FOLDER   (the folder holding scan/)
"""

import sys
import time

import numpy as np
import torch

from fusionkern.scan.backends import load_scan_model
from fusionkern.scan.decide import Verifier, read_recentred
from fusionkern.scan.review import load_scan

torch.set_num_threads(1)
scan = load_scan(sys.argv[1] + "/scan")
grid, rng = scan.grid, np.random.default_rng(0)
points = [tuple(grid.affine * (rng.uniform(40, grid.width - 40), rng.uniform(40, grid.height - 40)))
          for _ in range(161)]
t = time.perf_counter()
chips, valid = read_recentred(scan.inputs, grid, scan.layout, points)
t_read = time.perf_counter() - t
checkpoint = scan.report["checkpoint"]
model = load_scan_model(checkpoint["path"] if isinstance(checkpoint, dict) else checkpoint)
verifier = Verifier([c["path"] for c in scan.report["verifier"]["checkpoints"]], model)
t = time.perf_counter()
verifier.log_odds(chips[valid])
t_model = time.perf_counter() - t
print(f"read {t_read:.2f} s, models {t_model:.2f} s for {int(valid.sum())} chips")
