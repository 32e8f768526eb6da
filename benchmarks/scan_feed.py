"""The scan's input side against raw reads of the same windows, in one run: chips cut and scaled on the host
(numpy, the path of predictors without ``score_tensor``) or on the model's device (``fusionkern.scan.feed``), read
by threads or by processes, on an uncompressed and a DEFLATE copy of one generated region.

Usage::

    python benchmarks/scan_feed.py --out DIR [--size-px 2048] [--workers 1 2] [--repeats 3] [--device cpu]

Writes ``DIR/feed.json`` and ``DIR/feed.md`` and prints the table. Every figure is the fastest of ``--repeats``
rounds (a shared machine's noise only ever slows a run down); "per core" divides by the readers and the scanning
thread, the cores the input side keeps busy.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

VARIANTS = (("host", "threads", None), ("device", "threads", "cpu"), ("device", "processes", "cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size-px", type=int, default=2048, help="side of the generated region (default 2048)")
    parser.add_argument("--tile-px", type=int, default=1024, help="tile window side (default 1024)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="reader counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the fastest is kept (default 3)")
    parser.add_argument("--device", default="cpu", help="where the device feed runs (cpu, cuda)")
    args = parser.parse_args(argv)

    import torch

    from fusionkern.bench.rawread import time_raw_reads
    from fusionkern.scan.engine import EngineOptions, make_benchmark_region, time_io

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fusionkern-feed-") as folder:
        for compress in (None, "deflate"):
            manifest = make_benchmark_region(Path(folder) / str(compress), args.size_px, compress=compress)
            for workers in args.workers:
                best: dict[str, dict] = {}
                for _ in range(max(1, args.repeats)):
                    runs = {"raw": time_raw_reads(manifest, tile_px=args.tile_px, workers=workers)}
                    for cut, readers, device in VARIANTS:
                        feed = args.device if device else None
                        options = EngineOptions(workers=workers, readers=readers)
                        runs[f"{cut}/{readers}"] = time_io(manifest, options=options, tile_px=args.tile_px,
                                                            feed_device=feed)  # fmt: skip
                    for key, run in runs.items():
                        if key not in best or run["chips_per_s"] > best[key]["chips_per_s"]:
                            best[key] = run
                raw = best["raw"]["chips_per_s"]
                for key, run in best.items():
                    cores = workers if key == "raw" else workers + 1
                    rows.append({
                        "rasters": compress or "uncompressed", "workers": workers, "variant": key,
                        "chips": run["chips"], "chips_per_s": round(run["chips_per_s"], 1),
                        "per_core": round(run["chips_per_s"] / cores, 1), "of_raw": round(run["chips_per_s"] / raw, 3),
                        "stage_s": {k: round(v, 3) for k, v in run.get("stage_s", {}).items()},
                    })  # fmt: skip
                    print(_row(rows[-1]), flush=True)
    record = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "torch": torch.__version__, "size_px": args.size_px,
              "tile_px": args.tile_px, "repeats": args.repeats, "device": args.device, "rows": rows}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feed.json").write_text(json.dumps(record, indent=2) + "\n")
    header = "| rasters | readers | variant | chips/s | per core | of raw reads |\n|---|---|---|---|---|---|\n"
    (out / "feed.md").write_text(header + "\n".join(_row(r) for r in rows) + "\n")
    return 0


def _row(r: dict) -> str:
    return (f"| {r['rasters']} | {r['workers']} | {r['variant']} | {r['chips_per_s']:.0f} | {r['per_core']:.0f} | "
            f"{r['of_raw']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
