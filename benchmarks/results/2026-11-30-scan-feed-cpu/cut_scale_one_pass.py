"""ChipFeed.chips, same run: cut and subtract in one pass (as committed) against the previous three passes
(copy, subtract, divide), on a random 1024 x 1024 px float32 window of 15 planes, chips of 35 px every 17 px, batches
of 256, one torch thread. Usage: OMP_NUM_THREADS=1 python cut_scale_one_pass.py

Same-run comparison of ChipFeed.chips (cut then subtract in one pass) against the previous three-pass form."""
import time
import numpy as np
import torch
from fusionkern.scan.feed import ChipFeed, _runs
from fusionkern.scan.grid import ChipLayout

def old_chips(feed, tile, index, cols):
    index = np.asarray(index, dtype=np.int64)
    c = feed.chip_px
    x = torch.empty((len(index), tile.views.shape[2], c, c), dtype=torch.float32)
    done = 0
    for row, first, count in _runs(index, cols):
        x[done:done + count].copy_(tile.views[row, first:first + count])
        done += count
    flat = torch.from_numpy(index)
    rows, columns = flat // cols, flat % cols
    lo, span = tile.lo[rows, columns], tile.span[rows, columns]
    return x.sub_(lo).div_(span).view(len(index), -1, 3, c, c)

torch.set_num_threads(1)
rng = np.random.default_rng(0)
stack = (280 + 10 * rng.random((5, 3, 1024, 1024))).astype(np.float32)
layout = ChipLayout(35, 17, 17, 17)
feed = ChipFeed(layout)
tile = feed.load(stack)
rows, cols = tile.views.shape[:2]
n = rows * cols
batches = [np.arange(s, min(s + 256, n)) for s in range(0, n, 256)]
for b in batches[:3]:
    np.testing.assert_allclose(feed.chips(tile, b, cols).numpy(), old_chips(feed, tile, b, cols).numpy(), atol=1e-6)
best = {"old": [], "new": []}
for rep in range(5):
    for name, fn in (("old", lambda b: old_chips(feed, tile, b, cols)), ("new", lambda b: feed.chips(tile, b, cols))):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        best[name].append(time.perf_counter() - t0)
for name, ts in best.items():
    print(f"{name}: {n / min(ts):,.0f} chips/s (best of 5; median {n / np.median(ts):,.0f})")
print(f"new / old: {min(best['old']) / min(best['new']):.2f}x")
