"""The input side against raw reads, the fastest of three rounds, with one and with two reader threads.

Run from two checkouts in turn to compare them in the same conditions (the figures in ``same_run_ab.txt``)::

    cd OLD && PYTHONPATH=$PWD python same_run_ab.py MANIFEST
    cd NEW && PYTHONPATH=$PWD python same_run_ab.py MANIFEST

``MANIFEST``: a region from :func:`fusionkern.scan.engine.make_benchmark_region` (4096 px, DEFLATE or not).
"""

from __future__ import annotations

import sys

import torch

import fusionkern
from fusionkern.bench.rawread import time_raw_reads
from fusionkern.scan.engine import EngineOptions, time_io


def main(manifest: str) -> None:
    torch.set_num_threads(1)
    where = fusionkern.__file__.split("/fusionkern/")[0]
    for readers in (1, 2):
        raw = io = 0.0
        for _ in range(3):
            raw = max(raw, time_raw_reads(manifest, tile_px=1024, workers=readers)["chips_per_s"])
            io = max(io, time_io(manifest, options=EngineOptions(workers=readers), tile_px=1024)["chips_per_s"])
        print(f"{where} readers {readers} raw {raw:8.0f} io {io:8.0f} ratio {io / raw:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
