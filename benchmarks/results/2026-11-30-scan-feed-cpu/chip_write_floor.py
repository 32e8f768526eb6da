"""What one core can write: the floor under the feed's per-core goals on the CPU.

A scaled chip is 5 x 3 x 35 x 35 float32 = 73.5 KB, and the model takes a batch of them contiguous, so on a CPU every
chip is written once, whatever the feed does before. This times, on one torch thread, with a random 1007 px window
(a 1024 px tile's window) and batches of 256 as the scan makes them:

* ``memcpy``: a contiguous 256 MB tensor copy (the machine's write bandwidth from one core);
* ``gather``: the chips copied out of the window into the batch and nothing else (``Tensor.copy_`` from the chip
  views, run by run), the least any feed producing float32 chips on the host can do;
* ``feed``: ``ChipFeed.chips`` as the scan runs it (gather, subtract, divide).

Usage: ``python chip_write_floor.py`` (prints; each figure is the fastest of 7 rounds).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fusionkern.scan.feed import ChipFeed, _runs
from fusionkern.scan.grid import ChipLayout

CHIP, STRIDE, SIDE, BATCH = 35, 17, 1007, 256


def fastest(fn, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    n = (SIDE - CHIP) // STRIDE + 1
    feed = ChipFeed(ChipLayout(CHIP, STRIDE, n, n), "cpu")
    stack = np.random.default_rng(0).uniform(1000, 30000, (5, 3, SIDE, SIDE)).astype(np.float32)
    tile = feed.load(stack)
    index = np.arange(n * n)
    chip_bytes = 15 * CHIP * CHIP * 4
    batch = torch.empty(BATCH * 15 * CHIP * CHIP)

    def gather() -> None:
        for start in range(0, len(index), BATCH):
            part = index[start : start + BATCH]
            x = batch[: len(part) * 15 * CHIP * CHIP].view(len(part), 15, CHIP, CHIP)
            done = 0
            for row, first, count in _runs(part, n):
                x[done : done + count].copy_(tile.views[row, first : first + count])
                done += count

    def cut_and_scale() -> None:
        for start in range(0, len(index), BATCH):
            feed.chips(tile, index[start : start + BATCH], n)

    src, dst = torch.rand(64 * 2**20), torch.empty(64 * 2**20)
    memcpy_s = fastest(lambda: dst.copy_(src))
    print(f"memcpy: {src.numel() * 4 / memcpy_s / 1e9:.1f} GB/s written by one core "
          f"({src.numel() * 4 / memcpy_s / chip_bytes:,.0f} chips' worth per s)")
    for name, fn in (("gather", gather), ("feed", cut_and_scale)):
        seconds = fastest(fn)
        print(f"{name}: {len(index) / seconds:,.0f} chips/s on one core ({len(index) * chip_bytes / seconds / 1e9:.1f} "
              f"GB/s of chips written), {len(index)} chips")


if __name__ == "__main__":
    main()
