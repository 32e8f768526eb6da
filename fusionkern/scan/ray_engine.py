"""The Ray engine: the region's tiles as a Ray Dataset, scored by a pool of actors that each hold one model.

Each actor opens the rasters itself, so they must be readable from every node (a shared file system, or GDAL
paths such as ``/vsis3/...``); the checkpoint travels through Ray's object store. An actor reads, cuts and scores
one tile at a time with the same code and the same batches as the local engine
(:func:`fusionkern.scan.tiles.process_tile`), so the scores are the local engine's. Actors ask for one GPU each
where CUDA is available, otherwise one CPU. Finished tiles come back to the driver, which records them for
``--resume`` and assembles the outputs.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

from fusionkern.errors import MissingDependencyError
from fusionkern.scan.backends import EXPORTED_SUFFIXES
from fusionkern.scan.engine import EngineOptions, EngineStats
from fusionkern.scan.grid import ChipLayout, ScanGrid
from fusionkern.scan.inputs import ScanInputs
from fusionkern.scan.tiles import StackReader, Tile, TileResult, process_tile

_TILE_FIELDS = ("ti", "tj", "row0", "col0", "rows", "cols")


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or the extra that provides it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("ray[data]", "ray", "The ray engine (--engine ray)") from exc
    return ray


class TileScorer:
    """A Ray Data actor: one model and one set of open rasters, scoring the tiles of each batch it is given.

    Args:
        inputs: :meth:`ScanInputs.to_dict` of the scan's inputs.
        grid: The scan grid.
        layout: The chips.
        checkpoint: ``[bytes reference, sidecar bytes reference or None, file name]`` of the checkpoint (or of an
            exported model and its sidecar).
        backend: Predictor backend.
        options: Batch size and threshold.
        tile_chips: Chips per tile side (results are padded to it).
        cache_dir: Folder for exported artefacts.
        preset: The preset the scan expects.
    """

    def __init__(
        self,
        inputs: dict[str, Any],
        grid: ScanGrid,
        layout: ChipLayout,
        checkpoint: list[Any],
        backend: str,
        options: EngineOptions,
        tile_chips: int,
        cache_dir: str | None = None,
        preset: str | None = None,
    ):
        import ray
        import torch

        from fusionkern.scan.backends import load_scan_model, make_predictor

        payload, sidecar, name = checkpoint
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        cache = cache_dir or tempfile.mkdtemp(prefix="fusionkern-export-")
        with tempfile.TemporaryDirectory(prefix="fusionkern-actor-") as folder:
            path = os.path.join(folder, name)
            with open(path, "wb") as handle:
                handle.write(ray.get(payload))
            if sidecar is not None:  # an exported model travels with its sidecar, which is checked against it
                with open(path + ".json", "wb") as handle:
                    handle.write(ray.get(sidecar))
            model = load_scan_model(path, preset, backend)
            # Built while the file exists: an exported model is read by its runtime here.
            self.predictor = make_predictor(backend, model, device, cache, options.batch_size)
        self.reader = StackReader(ScanInputs.from_dict(inputs), grid, layout)
        self.layout, self.options, self.tile_chips = layout, options, tile_chips

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Scores the tiles of ``batch`` (columns ``ti, tj, row0, col0, rows, cols``)."""
        n, size = len(batch["ti"]), self.tile_chips
        scores = np.full((n, size, size), np.nan, dtype=np.float32)
        reasons = np.zeros((n, size, size), dtype=np.uint8)
        timings = np.zeros((n, 3), dtype=np.float64)
        for k in range(n):
            tile = Tile(*(int(batch[name][k]) for name in _TILE_FIELDS))
            result = process_tile(
                self.reader, self.predictor, tile, self.layout, self.options.batch_size, self.options.max_invalid
            )
            scores[k, : tile.rows, : tile.cols] = result.scores
            reasons[k, : tile.rows, : tile.cols] = result.reasons
            timings[k] = [result.timings[s] for s in ("read", "cut", "inference")]
        out = {name: np.asarray(batch[name]) for name in _TILE_FIELDS}
        out.update(scores=scores, reasons=reasons, timings=timings)
        return out


def run_ray(
    inputs: ScanInputs,
    grid: ScanGrid,
    layout: ChipLayout,
    tiles: Sequence[Tile],
    tile_chips: int,
    checkpoint: str | os.PathLike,
    backend: str,
    options: EngineOptions,
    on_tile: Callable[[TileResult], None] = lambda result: None,
    address: str | None = None,
    cache_dir: str | None = None,
    preset: str | None = None,
) -> EngineStats:
    """Scores ``tiles`` on a Ray cluster (an existing connection, ``address``, or a new local instance).

    Args:
        inputs: The rasters (readable from every node).
        grid: The scan grid.
        layout: The chips.
        tiles: The tiles to do.
        tile_chips: Chips per tile side.
        checkpoint: The checkpoint file (read here, shipped through the object store).
        backend: Predictor backend of the actors.
        options: Batch size, threshold and ``workers``, the number of actors.
        on_tile: Called in this process with every finished tile.
        address: Ray cluster address (``ray://...``, ``auto``); None reuses a connection this process already has,
            or starts a local instance with ``workers`` CPUs (shut down again at the end).
        cache_dir: Folder for exported artefacts (on each node).
        preset: The preset the scan expects.

    Returns:
        Counts and timings (stage seconds summed over actors).
    """
    ray = require_ray()
    stats = EngineStats()
    start = time.perf_counter()
    if not tiles:
        return stats
    started = not ray.is_initialized()
    verbose = logging.getLogger("fusionkern").isEnabledFor(logging.INFO)  # fusionkern --verbose
    _quiet_ray_data(ray, verbose)
    if started:
        # Ray's own INFO lines (and the workers' output) only with --verbose; warnings and errors always.
        level = logging.INFO if verbose else logging.WARNING
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose, "logging_level": level}
        if address:
            ray.init(address=address, **init)
        else:
            ray.init(num_cpus=max(1, options.workers), **init)
    try:
        _score(ray, inputs, grid, layout, tiles, tile_chips, checkpoint, backend, options, on_tile, cache_dir, preset,
               stats)  # fmt: skip
    finally:
        if started:
            ray.shutdown()
    stats.wall_s = time.perf_counter() - start
    return stats


def _quiet_ray_data(ray: Any, verbose: bool) -> None:
    """Ray Data's progress bars and INFO logging only with --verbose (the scan shows its own progress)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = verbose
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def _score(
    ray: Any,
    inputs: ScanInputs,
    grid: ScanGrid,
    layout: ChipLayout,
    tiles: Sequence[Tile],
    tile_chips: int,
    checkpoint: str | os.PathLike,
    backend: str,
    options: EngineOptions,
    on_tile: Callable[[TileResult], None],
    cache_dir: str | None,
    preset: str | None,
    stats: EngineStats,
) -> None:
    """Runs the actor pool over the tiles and hands each result to ``on_tile``."""
    import torch

    with open(checkpoint, "rb") as handle:
        payload = ray.put(handle.read())
    sidecar_path = f"{os.fspath(checkpoint)}.json"
    sidecar = None
    if os.path.splitext(os.fspath(checkpoint))[1].lower() in EXPORTED_SUFFIXES and os.path.isfile(sidecar_path):
        with open(sidecar_path, "rb") as handle:
            sidecar = ray.put(handle.read())
    shipped = [payload, sidecar, os.path.basename(os.fspath(checkpoint))]
    gpus = 1 if torch.cuda.is_available() else 0
    items = [{name: getattr(t, name) for name in _TILE_FIELDS} for t in tiles]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        TileScorer,
        fn_constructor_kwargs={
            "inputs": inputs.to_dict(), "grid": grid, "layout": layout, "checkpoint": shipped, "backend": backend,
            "options": options, "tile_chips": tile_chips, "cache_dir": cache_dir, "preset": preset,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, options.workers)),
        num_gpus=gpus,
        num_cpus=1,
    )  # fmt: skip
    for row in dataset.iter_rows():
        tile = Tile(*(int(row[name]) for name in _TILE_FIELDS))
        read_s, cut_s, infer_s = (float(v) for v in row["timings"])
        result = TileResult(
            tile,
            np.asarray(row["scores"])[: tile.rows, : tile.cols].copy(),
            np.asarray(row["reasons"])[: tile.rows, : tile.cols].copy(),
            {"read": read_s, "cut": cut_s, "inference": infer_s},
        )
        stats.add(result)
        on_tile(result)
