"""The scan's input side on windows that hold invalid pixels (NaN: nodata, cloud, or the region's edge) against
windows that hold none, in chips/s and as a share of raw reads of the same windows, one reader thread.

A generated 2048 px DEFLATE region (``make_benchmark_region``, 512 px blocks) read in tiles of 1024 px, whose four
large windows lie inside the rasters (finite; the thin edge tiles overhang), and of 1060 px, whose four windows all
overhang the rasters' edge and so carry NaN. Each figure is the best of three rounds; raw reads timed in the same
rounds. ``python nonfinite_windows.py LABEL`` prints one line per tile size.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from fusionkern.bench.rawread import time_raw_reads
from fusionkern.scan.engine import EngineOptions, make_benchmark_region, time_io


def main(label: str, folder: str | None = None) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fusionkern-nonfinite-") as tmp:
        manifest = Path(folder) / "manifest.yaml" if folder else None
        if manifest is None or not manifest.is_file():
            manifest = make_benchmark_region(Path(folder or tmp), 2048, compress="deflate")
        for tile_px in (1024, 1060):
            best = raw = 0.0
            for _ in range(3):
                raw = max(raw, time_raw_reads(manifest, tile_px=tile_px, workers=1)["chips_per_s"])
                run = time_io(manifest, options=EngineOptions(workers=1, readers="threads"), tile_px=tile_px,
                              feed_device="cpu")  # fmt: skip
                best = max(best, run["chips_per_s"])
            print(f"{label}: tiles of {tile_px} px: input side {best:,.0f} chips/s, raw reads {raw:,.0f} chips/s, "
                  f"{best / raw:.2f}x", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this commit", sys.argv[2] if len(sys.argv) > 2 else None)
