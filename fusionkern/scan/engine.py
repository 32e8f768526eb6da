"""The local engine: a thread pool reads and cuts tiles while the calling thread runs the model, and timing helpers
that measure I/O alone, inference alone and the whole scan on a generated raster.

Reader threads each hold their own open rasters (:class:`~fusionkern.scan.tiles.StackReader`; GDAL handles are
not shared between threads). For a predictor that takes chips on its device (``score_tensor``: the torch, triton,
onnxruntime and tensorrt backends) they hand over whole tile windows: the calling thread puts each window on the model's
device once and cuts and scales its chips there (:mod:`fusionkern.scan.feed`), so no chip is ever copied on the
host; at most one window per thread waits in the queue, and windows are read into a fixed set of reused buffers
(one being read per thread, one waiting per thread, the one being scored). For other predictors they put scaled
(or, for ``expects_raw``, raw) chip batches on the queue, at most ``queue_batches`` of them, and one tile window per
thread. Either way memory stays bounded whatever the size of the region. The calling thread scores and hands each
finished tile to a callback. GDAL reads and numpy release the GIL, so reading overlaps with inference.
"""

from __future__ import annotations

import contextlib
import queue
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from fusionkern import BRANCHES
from fusionkern.readers import N_DATES
from fusionkern.scan.feed import ChipFeed, uses_feed
from fusionkern.scan.grid import ChipLayout, ScanGrid
from fusionkern.scan.inputs import ScanInputs
from fusionkern.scan.tiles import (
    Predictor,
    StackReader,
    Tile,
    TileResult,
    chip_batches,
    chip_reasons,
    cloud_as_nan,
    score_window,
)

_POLL_S = 0.1


@dataclass
class EngineStats:
    """What an engine run did and how long each stage took.

    Attributes:
        tiles: Tiles finished.
        chips: Chips of those tiles (scored and skipped).
        scored: Chips scored.
        stage_s: Seconds per stage, summed over threads or workers: ``read`` (read + calibrate + mask),
            ``cut`` (chips copied and scaled), ``inference``, ``wait`` (the model waiting for chips).
        wall_s: Wall-clock seconds of the run.
        readers: ``threads`` where reader processes were asked for but could not start (their shared memory
            would not fit), else None.
    """

    tiles: int = 0
    chips: int = 0
    scored: int = 0
    readers: str | None = None
    stage_s: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "cut": 0.0, "inference": 0.0, "wait": 0.0})
    wall_s: float = 0.0

    def add(self, result: TileResult) -> None:
        """Counts a finished tile."""
        self.tiles += 1
        self.chips += result.tile.n_chips
        self.scored += int(np.isfinite(result.scores).sum())
        for stage, seconds in result.timings.items():
            self.stage_s[stage] = self.stage_s.get(stage, 0.0) + seconds


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs.

    Attributes:
        batch_size: Chips per predictor call.
        max_invalid: Largest invalid fraction of a chip that is still scored.
        workers: Readers (local: threads or processes) or actors (Ray).
        queue_batches: Batches waiting between readers and the model, at most (thread readers feeding a
            predictor that takes host chips).
        readers: ``threads`` (in this process) or ``processes`` (:mod:`fusionkern.scan.procs`; the local engine).
    """

    batch_size: int = 256
    max_invalid: float = 0.0
    workers: int = 2
    queue_batches: int = 8
    readers: str = "threads"


class _Stop(Exception):
    """Raised inside a reader thread when the run is being abandoned."""


class _Windows:
    """Tile window buffers (float32, each as large as the largest window) shared by reader threads, at most
    ``limit`` of them, made as they are first needed and reused once given back."""

    def __init__(self, limit: int, size: int):
        self.limit, self.size, self.made = limit, size, 0
        self.free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self.lock = threading.Lock()

    def take(self, shape: tuple[int, ...], stop: threading.Event) -> np.ndarray:
        """A (contiguous) ``shape`` view of a free buffer; waits for one where ``limit`` are out.

        Raises:
            _Stop: ``stop`` was set while waiting.
        """
        return self._buffer(stop)[: int(np.prod(shape))].reshape(shape)

    def _buffer(self, stop: threading.Event) -> np.ndarray:
        while True:
            with contextlib.suppress(queue.Empty):
                return self.free.get_nowait()
            with self.lock:
                if self.made < self.limit:
                    self.made += 1
                    return np.empty(self.size, dtype=np.float32)
            with contextlib.suppress(queue.Empty):
                return self.free.get(timeout=_POLL_S)
            if stop.is_set():
                raise _Stop

    def give_back(self, window: np.ndarray) -> None:
        """Returns the buffer under ``window`` (from :meth:`take`), whose contents are no longer needed."""
        self.free.put(window.base)


class _Pipeline:
    """Reader threads feeding a bounded queue of ``(kind, tile, payload)`` items."""

    def __init__(
        self,
        inputs: ScanInputs,
        grid: ScanGrid,
        layout: ChipLayout,
        tiles: Sequence[Tile],
        options: EngineOptions,
        scale: bool,
        whole_tiles: bool = False,
    ):
        self.inputs, self.grid, self.layout, self.options, self.scale = inputs, grid, layout, options, scale
        self.whole_tiles = whole_tiles
        self.todo: queue.SimpleQueue[Tile] = queue.SimpleQueue()
        for tile in tiles:
            self.todo.put(tile)
        n_threads = max(1, min(options.workers, len(tiles)))
        # whole tile windows: each thread at most one waiting (two items: the window, then its end)
        size = 2 * n_threads if whole_tiles else max(1, options.queue_batches)
        self.out: queue.Queue[tuple[str, Any, Any]] = queue.Queue(maxsize=size)
        self.stop = threading.Event()
        # a window being read per thread, one waiting per thread, the one being scored: never more are alive, so
        # their buffers are reused (a fresh 61 MB window is new pages, zeroed by the kernel on first touch)
        windows = [tile.window(layout) for tile in tiles]
        self.windows = _Windows(2 * n_threads + 1, max(h * w for _, _, h, w in windows) * len(BRANCHES) * N_DATES)
        self.threads = [
            threading.Thread(target=self._work, name=f"scan-reader-{i}", daemon=True) for i in range(n_threads)
        ]

    def __enter__(self) -> _Pipeline:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        while any(t.is_alive() for t in self.threads):
            with contextlib.suppress(queue.Empty):
                while True:
                    self.out.get_nowait()
            for thread in self.threads:
                thread.join(timeout=_POLL_S)

    def _put(self, item: tuple[str, Any, Any]) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                self.out.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        try:
            with StackReader(self.inputs, self.grid, self.layout) as reader:
                while not self.stop.is_set():
                    try:
                        tile = self.todo.get_nowait()
                    except queue.Empty:
                        break
                    self._tile(reader, tile)
            self._put(("exit", None, None))
        except _Stop:
            pass
        except BaseException as exc:  # handed to the consuming thread, which raises it
            with contextlib.suppress(_Stop):
                self._put(("error", None, exc))

    def _tile(self, reader: StackReader, tile: Tile) -> None:
        t0 = time.perf_counter()
        top, left, height, width = tile.window(self.layout)
        out = self.windows.take((len(BRANCHES), N_DATES, height, width), self.stop) if self.whole_tiles else None
        data = reader.read(top, left, height, width, out=out)
        reasons = chip_reasons(data, tile, self.layout, self.options.max_invalid)
        t1 = time.perf_counter()
        if self.whole_tiles:
            self._put(("tile", tile, (reasons, t1 - t0, cloud_as_nan(data))))
            self._put(("end", tile, 0.0))
            return
        self._put(("tile", tile, (reasons, t1 - t0, None)))
        batches = chip_batches(data, reasons, self.layout, self.options.batch_size, self.scale)
        while True:
            t2 = time.perf_counter()
            item = next(batches, None)
            cut_s = time.perf_counter() - t2
            if item is None:
                break
            self._put(("batch", tile, (item, cut_s)))
        self._put(("end", tile, cut_s))

    def items(self) -> Iterator[tuple[str, Any, Any, float]]:
        """Queue items until every reader has finished, with the seconds spent waiting for each."""
        running = len(self.threads)
        while running:
            t0 = time.perf_counter()
            kind, tile, payload = self.out.get()
            waited = time.perf_counter() - t0
            if kind == "error":
                raise payload
            if kind == "exit":
                running -= 1
                continue
            yield kind, tile, payload, waited


def run_local(
    inputs: ScanInputs,
    grid: ScanGrid,
    layout: ChipLayout,
    tiles: Sequence[Tile],
    predictor: Predictor,
    options: EngineOptions,
    on_tile: Callable[[TileResult], None] = lambda result: None,
) -> EngineStats:
    """Scores ``tiles`` with reader threads overlapping the model.

    Args:
        inputs: The rasters.
        grid: The scan grid.
        layout: The chips.
        tiles: The tiles to do.
        predictor: Chips -> cement probability; called from this thread only. A predictor with ``score_tensor``
            and ``feed_device`` gets its chips cut and scaled on that device from whole tile windows; else
            readers cut the chips and scale them unless the predictor ``expects_raw``.
        options: Batch size, threshold, threads, queue size.
        on_tile: Called (in this thread) with every finished tile, in completion order.

    Returns:
        Counts and timings.

    Raises:
        InputError: A raster cannot be read (raised from the reader thread that hit it).
        Whatever ``predictor`` or ``on_tile`` raise; reader threads are stopped first.
    """
    stats = EngineStats()
    start = time.perf_counter()
    if not tiles:
        return stats
    open_tiles: dict[str, TileResult] = {}
    feed = ChipFeed(layout, predictor.feed_device) if uses_feed(predictor) else None
    pool = None
    if options.readers == "processes":
        from fusionkern.scan.procs import ReaderPool, SharedMemoryTooSmall

        try:
            pool = ReaderPool(inputs, grid, layout, tiles, options.workers, options.max_invalid)
        except SharedMemoryTooSmall as exc:  # e.g. a container's 64 MB /dev/shm: threads need none
            warnings.warn(f"{exc}; reading with threads instead", RuntimeWarning, stacklevel=2)
            stats.readers = "threads"
    if pool is not None:
        with pool:
            t0 = time.perf_counter()
            for window in pool.windows():
                stats.stage_s["wait"] += time.perf_counter() - t0
                result = score_window(window.tile, window.stack, window.reasons, predictor, layout,
                                      options.batch_size, feed)  # fmt: skip
                result.timings["read"] = window.read_s
                stats.add(result)
                on_tile(result)
                t0 = time.perf_counter()
        stats.wall_s = time.perf_counter() - start
        return stats
    scale = not getattr(predictor, "expects_raw", False)
    with _Pipeline(inputs, grid, layout, tiles, options, scale, whole_tiles=feed is not None) as pipeline:
        for kind, tile, payload, waited in pipeline.items():
            stats.stage_s["wait"] += waited
            if kind == "tile":
                reasons, read_s, stack = payload
                if stack is None:  # its chip batches follow
                    scores = np.full(reasons.shape, np.nan, dtype=np.float32)
                    result = TileResult(tile, scores, reasons, {"read": 0.0, "cut": 0.0, "inference": 0.0})
                else:
                    result = score_window(tile, stack, reasons, predictor, layout, options.batch_size, feed)
                    pipeline.windows.give_back(stack)
                result.timings["read"] = read_s
                open_tiles[tile.key] = result
            elif kind == "batch":
                (index, chips), cut_s = payload
                result = open_tiles[tile.key]
                t0 = time.perf_counter()
                result.scores.flat[index] = predictor(chips)
                result.timings["inference"] += time.perf_counter() - t0
                result.timings["cut"] += cut_s
            else:
                result = open_tiles.pop(tile.key)
                result.timings["cut"] += payload
                stats.add(result)
                on_tile(result)
    stats.wall_s = time.perf_counter() - start
    return stats


# --------------------------------------------------------------------------------------------------------------
# Timing helpers (the benchmark suite calls these)
# --------------------------------------------------------------------------------------------------------------


def make_benchmark_region(
    folder: str | Path,
    size_px: int = 2048,
    seed: int = 0,
    dtype: str = "uint16",
    compress: str | None = None,
    block_px: int = 512,
) -> Path:
    """Writes a generated region (four bands, three dates, one tiled GeoTIFF each) and its manifest.

    Values are smooth random fields in a Landsat-like DN range; no MTL is written, so the scan reads them as they
    are. Content does not matter for timing, only size, type, tiling and compression.

    Args:
        folder: Where the rasters and ``manifest.yaml`` go (created).
        size_px: Side of the region in pixels (30 m, UTM zone 50N).
        seed: Seed of the values.
        dtype: ``uint16`` (as Level-1 products) or ``float32``.
        compress: GDAL compression (``deflate``, ``zstd``, ...) or None.
        block_px: Tile size of the GeoTIFFs.

    Returns:
        The manifest's path.
    """
    import rasterio
    import yaml
    from rasterio.transform import from_origin

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    profile: dict[str, Any] = {
        "driver": "GTiff", "dtype": dtype, "count": 1, "width": size_px, "height": size_px, "crs": "EPSG:32650",
        "transform": from_origin(400_000.0, 3_500_000.0, 30.0, 30.0), "tiled": True, "blockxsize": block_px,
        "blockysize": block_px, "nodata": 0 if dtype == "uint16" else float("nan"),
    }  # fmt: skip
    if compress:
        profile["compress"] = compress
    manifest: dict[str, list[str]] = {}
    coarse = max(2, size_px // 64)
    for branch in ("b10", "b11", "b7", "b6"):
        manifest[branch] = []
        for date in range(3):
            field_ = rng.uniform(8000, 30000, (coarse, coarse)).astype(np.float32)
            values = np.kron(field_, np.ones((64, 64), np.float32))[:size_px, :size_px]
            values = np.pad(values, ((0, size_px - values.shape[0]), (0, size_px - values.shape[1])), mode="edge")
            values += rng.normal(0, 200, values.shape).astype(np.float32)
            name = f"{branch}_d{date + 1}.tif"
            with rasterio.open(folder / name, "w", **profile) as dst:
                dst.write(np.clip(values, 1, 65535).astype(dtype), 1)
            manifest[branch].append(name)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest), encoding="utf-8")
    return path


@dataclass
class _Setup:
    inputs: ScanInputs
    grid: ScanGrid
    layout: ChipLayout
    tiles: list[Tile]


def _setup(manifest: str | Path, chip_m: float, tile_px: int, stride_m: float | None) -> _Setup:
    from fusionkern.scan.grid import chip_layout, make_grid
    from fusionkern.scan.inputs import load_inputs
    from fusionkern.scan.tiles import plan_tiles, tile_chips_for

    inputs = load_inputs(manifest=manifest, calibrate=False)
    grid = make_grid(inputs.reference)
    layout = chip_layout(grid, chip_m, stride_m)
    return _Setup(inputs, grid, layout, plan_tiles(layout, tile_chips_for(layout, tile_px)))


class _NoModel:
    """A predictor that scores every chip 0: the input side alone. With ``feed_device`` set, chips are cut and
    scaled on that device, as the torch, triton, onnxruntime and tensorrt backends have them; else on the host."""

    expects_raw = False

    def __init__(self, feed_device: str | None):
        self.feed_device = torch.device(feed_device) if feed_device else None

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        return np.zeros(len(chips), np.float32)

    def score_tensor(self, chips: torch.Tensor) -> np.ndarray:
        if chips.device.type == "cuda":
            torch.cuda.synchronize(chips.device)  # the cut and scale have run
        return np.zeros(len(chips), np.float32)


def time_io(
    manifest: str | Path,
    chip_m: float = 1050.0,
    options: EngineOptions = EngineOptions(),
    tile_px: int = 1024,
    stride_m: float | None = None,
    feed_device: str | None = "cpu",
) -> dict[str, float]:
    """Reading, masking, cutting and scaling alone (the model replaced by zeros): chips/s of the input side.

    Args:
        manifest: A manifest (e.g. from :func:`make_benchmark_region`).
        chip_m: Chip side in metres.
        options: Engine options (threads, batch size).
        tile_px: Tile window side in pixels.
        stride_m: Stride in metres (None: half a chip).
        feed_device: Where chips are cut and scaled (``cpu``, ``cuda``; the model's device in a scan), or None
            for the host path (numpy, the path of predictors without ``score_tensor``).

    Returns:
        ``{"chips", "seconds", "chips_per_s", "stage_s"}``.
    """
    setup = _setup(manifest, chip_m, tile_px, stride_m)
    stats = run_local(setup.inputs, setup.grid, setup.layout, setup.tiles, _NoModel(feed_device), options)
    return {"chips": stats.scored, "seconds": stats.wall_s, "chips_per_s": stats.scored / max(stats.wall_s, 1e-9),
            "stage_s": dict(stats.stage_s)}  # fmt: skip


def time_inference(
    predictor: Predictor, chip_px: int, batch_size: int = 256, n_chips: int = 4096, seed: int = 0
) -> dict[str, float]:
    """The predictor alone on chips already in memory: the model's inference-only chips/s.

    Args:
        predictor: The predictor to time (warmed up with one batch first).
        chip_px: Chip side in pixels.
        batch_size: Chips per call, as in the scan.
        n_chips: Chips timed.
        seed: Seed of the random chips.

    Returns:
        ``{"chips", "seconds", "chips_per_s"}``.
    """
    chips = np.random.default_rng(seed).random((batch_size, 5, 3, chip_px, chip_px), dtype=np.float32)
    predictor(chips)
    n_calls = max(1, -(-n_chips // batch_size))
    t0 = time.perf_counter()
    for _ in range(n_calls):
        predictor(chips)
    seconds = time.perf_counter() - t0
    done = n_calls * batch_size
    return {"chips": done, "seconds": seconds, "chips_per_s": done / seconds}


def time_end_to_end(
    manifest: str | Path,
    predictor: Predictor,
    chip_m: float = 1050.0,
    options: EngineOptions = EngineOptions(),
    tile_px: int = 1024,
    stride_m: float | None = None,
) -> dict[str, Any]:
    """The local engine with the real predictor (no output files): the scan's end-to-end chips/s.

    Returns:
        ``{"chips", "seconds", "chips_per_s", "stage_s"}``.
    """
    setup = _setup(manifest, chip_m, tile_px, stride_m)
    predictor(np.zeros((1, 5, 3, setup.layout.chip_px, setup.layout.chip_px), np.float32))  # warm-up
    stats = run_local(setup.inputs, setup.grid, setup.layout, setup.tiles, predictor, options)
    return {
        "chips": stats.scored,
        "seconds": stats.wall_s,
        "chips_per_s": stats.scored / max(stats.wall_s, 1e-9),
        "stage_s": dict(stats.stage_s),
    }


def benchmark_scan(
    predictor: Predictor,
    chip_px: int = 35,
    size_px: int = 2048,
    options: EngineOptions = EngineOptions(),
    tile_px: int = 1024,
    folder: str | Path | None = None,
    compress: str | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """I/O alone, inference alone and end to end, on one generated region, in one run.

    With ``repeats`` > 1 the three measurements are taken in turn that many times and the fastest of each is kept,
    which is what a shared or throttled machine needs to compare them fairly.

    Args:
        predictor: The predictor to time.
        chip_px: The model's chip side at 30 m.
        size_px: Side of the generated region.
        options: Engine options.
        tile_px: Tile window side.
        folder: Where to write the region (None: a temporary folder, removed afterwards).
        compress: GDAL compression of the generated rasters.
        repeats: Rounds of the three measurements.

    Returns:
        ``{"io", "inference", "end_to_end", "ratio", "rounds"}``: the fastest of each timing, end-to-end over
        inference-only chips/s, and every round's chips/s.
    """
    best: dict[str, dict[str, Any]] = {}
    rounds = []
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="fusionkern-bench-"))
        manifest = make_benchmark_region(folder, size_px, compress=compress)
        chip_m = chip_px * 30.0
        for _ in range(max(1, int(repeats))):
            io = time_io(manifest, chip_m, options, tile_px)
            n_chips = max(options.batch_size, io["chips"] // 4)
            timings = {
                "io": io,
                "inference": time_inference(predictor, chip_px, options.batch_size, n_chips=n_chips),
                "end_to_end": time_end_to_end(manifest, predictor, chip_m, options, tile_px),
            }
            rounds.append({k: round(v["chips_per_s"], 1) for k, v in timings.items()})
            for key, value in timings.items():
                if key not in best or value["chips_per_s"] > best[key]["chips_per_s"]:
                    best[key] = value
    return {**best, "ratio": best["end_to_end"]["chips_per_s"] / best["inference"]["chips_per_s"], "rounds": rounds}
