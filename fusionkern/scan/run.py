"""A whole scan: options checked, inputs placed on the grid, tiles scored by an engine, outputs written.

:func:`run_scan` is what ``fusionkern scan`` calls. Every check that can fail on the user's input (checkpoint,
inputs, grid, overlap, output folder) runs before any tile is read; a scan that fails later leaves its finished
tiles in ``<out>/.tiles`` for ``--resume`` and no final output behind.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fusionkern import __version__
from fusionkern.errors import ConfigError, InputError
from fusionkern.scan import outputs, review, stac
from fusionkern.scan.decide import (
    MAX_CANDIDATES_PER_1000KM2,
    MIN_CANDIDATES,
    Decision,
    Verifier,
    resolve_decision,
    shift_scores,
)
from fusionkern.scan.backends import BACKENDS, chip_metres, load_scan_model, make_predictor
from fusionkern.scan.engine import EngineOptions, EngineStats, run_local
from fusionkern.scan.feed import uses_feed
from fusionkern.scan.grid import ChipLayout, ScanGrid, on_grid, stride_note
from fusionkern.files import check_writable, sha256_file
from fusionkern.progress import progress
from fusionkern.scan.inputs import ScanInputs, describe_inputs, file_identity
from fusionkern.scan.plan import place_region
from fusionkern.scan.procs import available_cores
from fusionkern.scan.resume import TILES_DIR, TileStore
from fusionkern.scan.tiles import NODATA, REASONS, SCORED, Tile, TileResult

ENGINES = ("local", "ray")
READERS = ("threads", "processes")
CACHE_DIR = ".cache"


@dataclass
class ScanOptions:
    """Everything ``fusionkern scan`` takes.

    Attributes:
        checkpoint: A FusionNet checkpoint.
        out: Output folder.
        scenes: Three Landsat scene folders, one per date (or ``manifest``).
        manifest: YAML manifest of the rasters (or ``scenes``).
        crs: Scan grid CRS (default: the first raster's).
        resolution: Scan grid pixel size in CRS units (default: the first raster's).
        bounds: Region ``(west, south, east, north)`` (default: the first raster's extent).
        bounds_crs: CRS of ``bounds``: ``auto``, ``lonlat``, ``grid`` or a CRS string.
        stride_m: Stride in metres (default: half a chip).
        threshold: Detection threshold (None: the checkpoint's calibrated one, else 0.5); on the verifier's
            score where ``verify`` is set, else on the chips' (prior-shifted) probability.
        prior: Deployment prior of cement chips (None: the calibrated one, else the training prior).
        verify: Verifier ensemble: ``auto``, a checkpoint, a training folder or a list file (None: no verifier).
        candidate_threshold: Chip probability from which sites are verified (None: calibrated or derived).
        max_invalid: Largest fraction of a chip's pixels that may be nodata or cloudy for it to be scored.
        batch_size: Chips per model call.
        tile_px: Side of the tile windows read at once, in pixels.
        workers: Readers (local engine) or actors (Ray engine); None: one reader process per available core,
            2 reader threads, or actors sized from the cluster's CPUs and GPUs.
        queue_batches: Batches in flight between reader threads and a model that takes host chips (local engine).
        readers: ``threads`` or ``processes`` (local engine; :mod:`fusionkern.scan.procs`). ``fusionkern scan``
            reads in processes by default; a Python script that asks for processes needs the
            ``if __name__ == "__main__":`` guard that Python's ``multiprocessing`` asks of it.
        backend: ``torch``, ``triton``, ``onnxruntime`` or ``tensorrt``.
        precision: The model's arithmetic: ``fp32`` or ``bf16`` (torch, triton on CUDA), ``fp16`` or ``fp32``
            (tensorrt); None: the backend's default (fp32; fp16 for tensorrt). Local engine.
        device: Torch device (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        engine: ``local`` or ``ray``.
        address: Ray cluster address (``--engine ray``).
        preset: Preset the checkpoint must have (None: any).
        calibrate: Convert DN with the MTL files (or Level-2 scalings).
        resume: Continue a killed scan in ``out``.
        overwrite: Replace a previous scan in ``out``.
        checksums: SHA-256 of local inputs in ``scan.json``.
        quicklook: Draw ``quicklook.png``.
        progress: Show a progress bar.
    """

    checkpoint: str
    out: str
    scenes: Sequence[str] | None = None
    manifest: str | None = None
    crs: str | None = None
    resolution: float | None = None
    bounds: Sequence[float] | None = None
    bounds_crs: str = "auto"
    stride_m: float | None = None
    threshold: float | None = None
    prior: float | None = None
    verify: str | None = None
    candidate_threshold: float | None = None
    max_invalid: float = 0.0
    batch_size: int = 256
    tile_px: int = 1024
    workers: int | None = None
    queue_batches: int = 8
    readers: str = "threads"
    backend: str = "torch"
    precision: str | None = None
    device: str = "auto"
    engine: str = "local"
    address: str | None = None
    preset: str | None = None
    calibrate: bool = True
    resume: bool = False
    overwrite: bool = False
    checksums: bool = True
    quicklook: bool = True
    progress: bool = True

    def validate(self) -> None:
        """Raises ConfigError on values that cannot work."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.readers not in READERS:
            raise ConfigError(f"--readers must be one of {', '.join(READERS)}, got {self.readers!r}")
        if not 0.0 <= self.max_invalid < 1.0:
            raise ConfigError(f"--max-invalid must be a fraction in [0, 1), got {self.max_invalid}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be a probability in [0, 1], got {self.threshold}")
        for name in ("batch_size", "tile_px", "workers", "queue_batches"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.precision is not None and self.engine == "ray":
            raise ConfigError("--precision is for the local engine; Ray actors run each backend's default")
        if self.address and self.engine != "ray":
            raise ConfigError("--address is for --engine ray")
        if self.bounds is not None and len(self.bounds) != 4:
            raise ConfigError(f"--bounds takes four numbers WEST SOUTH EAST NORTH, got {len(self.bounds)}")


@dataclass
class ScanResult:
    """What a scan produced.

    Attributes:
        out: The output folder.
        scores: (rows, cols) cement probability on the stride grid at the deployment prior, NaN where skipped.
        reasons: (rows, cols) SCORED / NODATA / CLOUD codes.
        detections: The detections, by rank.
        report: The contents of ``scan.json``.
        raw_scores: The model's probabilities before the prior shift.
        decision: The prior, threshold and verifier used.
        grid: The scan grid.
        layout: The chips on it.
        candidates: With a verifier, every candidate site it scored (those below the threshold too).
        inputs: The rasters scanned.
    """

    out: Path
    scores: np.ndarray
    reasons: np.ndarray
    detections: list[outputs.Detection]
    report: dict[str, Any] = field(repr=False)
    raw_scores: np.ndarray | None = field(default=None, repr=False)
    decision: Decision | None = field(default=None, repr=False)
    grid: ScanGrid | None = field(default=None, repr=False)
    layout: ChipLayout | None = field(default=None, repr=False)
    candidates: list[outputs.Detection] = field(default_factory=list, repr=False)
    inputs: ScanInputs | None = field(default=None, repr=False)

    def lines(self) -> list[str]:
        """A short human-readable summary."""
        counts, timing = self.report["counts"], self.report["timings"]
        skipped = ", ".join(f"{n} {why}" for why, n in counts["skipped"].items() if n) or "none"
        return [
            f"scored {counts['scored']} of {counts['chips']} chips (skipped: {skipped}); "
            f"{counts['detections']} detection(s) from {counts['positive_chips']} positive chip(s)",
            f"{timing['chips_per_s']['whole_run'] or 0:.0f} chips/s over the whole run ({timing['wall_s']:.1f} s: setup, "
            f"model preparation and outputs included), {timing['chips_per_s']['end_to_end']:.0f} chips/s while scoring",
            f"outputs in {self.out}: {', '.join(self.report['outputs'])}",
        ]


# --------------------------------------------------------------------------------------------------------------
# Preparing
# --------------------------------------------------------------------------------------------------------------


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> list[str] | None:
    """Checks the output folder (writable; no previous scan unless ``resume`` or ``overwrite``); with ``overwrite``,
    removes a previous scan's outputs. Returns what the folder held before (None: it did not exist)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    check_writable(out, "--out", inside=True)
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    previous = [name for name in outputs.FINAL_OUTPUTS if (out / name).exists()]
    previous += [TILES_DIR] if any((out / TILES_DIR).glob("*.npz")) else []  # records without a tile hold nothing
    if previous and not (resume or overwrite):
        raise InputError(
            f"output folder {out} holds a previous scan ({', '.join(previous)}); "
            "pass --resume to continue it or --overwrite to start over"
        )
    if overwrite:
        for name in outputs.FINAL_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    return before  # the folder itself is created with the tile records (TileStore.start)


def _write_report(out: Path, report: dict[str, Any]) -> None:
    """Writes the STAC item and ``scan.json``, the last outputs; where that fails, the other outputs go too (never a
    partial set)."""
    try:
        stac.write_item(out, report, stac.report_bytes(report))  # lists scan.json with the checksum of these bytes
        outputs.write_json(out / outputs.SCAN_JSON, report)
    except BaseException:
        for name in outputs.FINAL_OUTPUTS:
            (out / name).unlink(missing_ok=True)
        raise


def _forget_unstarted(out: Path, store: TileStore, before: list[str] | None) -> None:
    """After a failure before any tile was recorded: removes what this run created, so that rerunning the same
    command once the cause is fixed starts cleanly (a scan with recorded tiles keeps them for ``--resume``)."""
    if any(store.folder.glob("*.npz")):
        return
    for name in (TILES_DIR, CACHE_DIR):
        if before is None or name not in before:
            shutil.rmtree(out / name, ignore_errors=True)
    if before is None and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _resolve_device(name: str, backend: str) -> Any:
    from fusionkern.devices import resolve_device

    if backend in ("onnxruntime",):
        return resolve_device("cpu")
    return resolve_device(name)


@dataclass
class _Plan:
    inputs: ScanInputs
    grid: ScanGrid
    layout: ChipLayout
    tiles: list[Tile]
    tile_chips: int
    model: Any
    checkpoint_sha256: str
    decision: Decision


def _plan(options: ScanOptions) -> _Plan:
    model = load_scan_model(options.checkpoint, options.preset, options.backend)
    decision = resolve_decision(model, options.checkpoint, options.threshold, options.prior, options.verify,
                                options.candidate_threshold)  # fmt: skip
    region = place_region(options, chip_metres(model))  # what fusionkern scan --plan lays out too
    return _Plan(region.inputs, region.grid, region.layout, region.tiles, region.tile_chips, model,
                 sha256_file(options.checkpoint), decision)  # fmt: skip


def _params(options: ScanOptions, plan: _Plan) -> dict[str, Any]:
    """Everything that decides a tile's scores (a resumed scan must match it)."""
    return {
        "inputs": plan.inputs.to_dict(),
        "files": [file_identity(p) for p in plan.inputs.rasters() + plan.inputs.mtl_files()],
        "checkpoint_sha256": plan.checkpoint_sha256,
        "backend": options.backend,
        "grid": asdict(plan.grid),
        "layout": asdict(plan.layout),
        "tile_chips": plan.tile_chips,
        "batch_size": options.batch_size,
        "max_invalid": options.max_invalid,
    }


class _Checksums(threading.Thread):
    """Hashes the inputs in the background while the scan runs."""

    def __init__(self, inputs: ScanInputs, enabled: bool):
        super().__init__(name="scan-checksums", daemon=True)
        self.inputs, self.enabled = inputs, enabled
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = describe_inputs(self.inputs, self.enabled)
        except BaseException as exc:  # reported by join_result
            self.error = exc

    def join_result(self) -> dict[str, Any]:
        self.join()
        if self.error is not None:
            raise InputError(f"cannot fingerprint the inputs: {self.error}") from self.error
        return self.result or {}


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


class _Collector:
    """Places finished tiles in the region's arrays, records them and advances the progress bar."""

    def __init__(self, layout: ChipLayout, store: TileStore):
        self.scores = np.full((layout.n_rows, layout.n_cols), np.nan, dtype=np.float32)
        self.reasons = np.full((layout.n_rows, layout.n_cols), NODATA, dtype=np.uint8)
        self.store = store
        self.total = layout.n_chips
        self.bar: Any = None

    def place(self, tile: Tile, scores: np.ndarray, reasons: np.ndarray) -> None:
        """Copies one tile's results into the region's arrays."""
        rows = slice(tile.row0, tile.row0 + tile.rows)
        cols = slice(tile.col0, tile.col0 + tile.cols)
        self.scores[rows, cols] = scores
        self.reasons[rows, cols] = reasons

    def __call__(self, result: TileResult) -> None:
        self.store.save(result.tile, result.scores, result.reasons)
        self.place(result.tile, result.scores, result.reasons)
        if self.bar is not None:
            self.bar.update(result.tile.n_chips)

    def resume(self, tiles: Sequence[Tile]) -> list[Tile]:
        """Loads the recorded tiles; returns those still to do."""
        todo = []
        for tile in tiles:
            record = self.store.load(tile)
            if record is None:
                todo.append(tile)
            else:
                self.place(tile, *record)
        return todo

    def start_bar(self, done: int, enabled: bool) -> None:
        """A progress bar over all chips (chips/s and time left), starting at the chips already done."""
        self.bar = progress(self.total, "scan", "chip", initial=done, enabled=enabled)

    def close(self) -> None:
        """Closes the progress bar."""
        if self.bar is not None:
            self.bar.close()


def _run_engine(
    options: ScanOptions, plan: _Plan, todo: list[Tile], collect: Callable[[TileResult], None], out: Path
) -> tuple[EngineStats, dict[str, Any]]:
    """Scores the tiles still to do with the chosen engine; returns its stats and the backend's description (with
    the Ray engine, the cluster's under ``cluster``)."""
    engine_options = EngineOptions(options.batch_size, options.max_invalid, _local_workers(options),
                                   options.queue_batches, options.readers)  # fmt: skip
    if options.engine == "ray":
        from fusionkern.scan.ray_engine import RayJob, run_ray

        job = RayJob(plan.inputs, plan.grid, plan.layout, plan.tile_chips, str(options.checkpoint),
                     plan.checkpoint_sha256, options.backend, options.device, options.preset, engine_options,
                     options.workers, options.address)  # fmt: skip
        run = run_ray(job, todo, collect)
        return run.stats, {**run.backend, "cluster": run.cluster}
    cache = str(out / CACHE_DIR / plan.checkpoint_sha256[:16])
    device = _resolve_device(options.device, options.backend)
    predictor = make_predictor(options.backend, plan.model, device, cache, options.batch_size, options.precision)
    stats = run_local(plan.inputs, plan.grid, plan.layout, todo, predictor, engine_options, collect)
    described = predictor.describe()
    if stats.readers:
        described["readers_note"] = "reader processes could not start (shared memory too small); read with threads"
    if uses_feed(predictor):
        described["chips_cut_and_scaled_on"] = str(predictor.feed_device)
    return stats, described


def _local_workers(options: ScanOptions) -> int:
    """Readers of the local engine: as asked, else one process per available core, or the default threads."""
    if options.workers is not None:
        return int(options.workers)
    return available_cores() if options.readers == "processes" else EngineOptions.workers


def _timings(stats: EngineStats, setup_s: float, outputs_s: float, wall_s: float) -> dict[str, Any]:
    def rate(seconds: float) -> float | None:
        return round(stats.scored / seconds, 1) if seconds > 0 and stats.scored else None

    stages = {k: round(v, 3) for k, v in stats.stage_s.items()}
    return {
        "setup_s": round(setup_s, 3),
        "engine_s": round(stats.wall_s, 3),
        "outputs_s": round(outputs_s, 3),
        "wall_s": round(wall_s, 3),
        "stage_s": stages,
        "chips_per_s": {
            "read": rate(stats.stage_s.get("read", 0.0)),
            "cut": rate(stats.stage_s.get("cut", 0.0)),
            "inference": rate(stats.stage_s.get("inference", 0.0)),
            "end_to_end": rate(stats.wall_s) or 0.0,
            "whole_run": rate(wall_s),
        },
        "note": "stage seconds are summed over reader threads or actors; chips/s counts chips scored in this run",
    }


def _counts(
    collector: _Collector, scores: np.ndarray, detections: Sequence[outputs.Detection], decision: Decision
) -> dict[str, Any]:
    reasons = collector.reasons
    chip_threshold = decision.candidate_threshold if decision.verify else decision.threshold
    with np.errstate(invalid="ignore"):
        positive = int((np.nan_to_num(scores, nan=-1.0) >= chip_threshold).sum())
    return {
        "chips": int(reasons.size),
        "scored": int((reasons == SCORED).sum()),
        "skipped": {name: int((reasons == code).sum()) for code, name in REASONS.items()},
        "positive_chips": positive,
        "detections": len(detections),
    }


def _describe_checkpoint(options: ScanOptions, plan: _Plan) -> dict[str, Any]:
    model = plan.model
    return {
        "path": str(options.checkpoint),
        "sha256": plan.checkpoint_sha256,
        "class": getattr(model, "model_class", type(model).__name__),
        "preset": model.preset.name,
        "config": model.config,
        "data": model.checkpoint["data"],
    }


def _write_outputs(
    out: Path, options: ScanOptions, plan: _Plan, scores: np.ndarray, detections: list[outputs.Detection],
    report: dict[str, Any],
) -> None:
    """Writes scores, detections, the quick look and the review page; on failure removes those already written."""
    try:
        _write_maps(out, options, plan, scores, detections, report)
    except BaseException:
        for name in outputs.FINAL_OUTPUTS:  # never a partial set of outputs
            (out / name).unlink(missing_ok=True)
        raise


def _write_maps(
    out: Path, options: ScanOptions, plan: _Plan, scores: np.ndarray, detections: list[outputs.Detection],
    report: dict[str, Any],
) -> None:
    grid, layout, decision = plan.grid, plan.layout, plan.decision
    tags = {
        "fusionkern_version": __version__, "checkpoint_sha256": plan.checkpoint_sha256,
        "threshold": decision.threshold, "prior": decision.prior,
    }  # fmt: skip
    outputs.write_scores_cog(out / outputs.SCORES, scores, grid, layout, tags)
    meta = {"fusionkern": {
        "threshold": decision.threshold, "prior": decision.prior, "verified": bool(decision.verify),
        "checkpoint_sha256": plan.checkpoint_sha256, "area_km2": scanned_area_km2(scores, layout, grid),
    }}  # fmt: skip
    outputs.write_geojson(out / outputs.GEOJSON, detections, meta)
    outputs.write_geoparquet(out / outputs.PARQUET, detections)
    composite = review.read_composite(plan.inputs, grid, layout) if options.quicklook else None  # and the page's
    if options.quicklook:
        outputs.write_quicklook(out / outputs.QUICKLOOK, composite, scores, grid, layout, detections,
                                decision.threshold, f"{Path(out).name}: {len(detections)} detection(s)")  # fmt: skip
    report["review"] = review.write_review(out, report, grid, layout, plan.inputs, scores, composite)


def scanned_area_km2(scores: np.ndarray, layout: ChipLayout, grid: ScanGrid) -> float:
    """Area of the scored chips, km²: one stride cell per scored chip (the cells tile the region)."""
    side_m = layout.stride_px * grid.res * grid.metres_per_unit
    return round(float(np.isfinite(scores).sum()) * side_m * side_m / 1e6, 3)


def detect(
    scores: np.ndarray, plan: _Plan, options: ScanOptions, verifier: Verifier | None = None
) -> tuple[list[outputs.Detection], list[outputs.Detection], dict[str, Any]]:
    """The scan's detections: sites above the threshold, or verified candidates above it.

    Args:
        scores: Prior-shifted chip probabilities.
        plan: The scan's plan (grid, layout, inputs, decision).
        options: The scan's options.
        verifier: The ensemble (built from ``plan.decision.verify`` when None and the decision asks for one).

    Returns:
        The detections by rank, every candidate scored (with a verifier; else empty) and what the verifier did.
    """
    decision, grid, layout = plan.decision, plan.grid, plan.layout
    context = {"threshold": round(decision.threshold, 8), "prior": decision.prior,
               "model_sha256": plan.checkpoint_sha256}  # fmt: skip
    if not decision.verify:
        return outputs.find_detections(scores, layout, grid, decision.threshold, context=context), [], {}
    t0 = time.perf_counter()
    if verifier is None:
        verifier = _build_verifier(plan, options)
    cap = max(MIN_CANDIDATES, math.ceil(MAX_CANDIDATES_PER_1000KM2 * scanned_area_km2(scores, layout, grid) / 1000.0))
    candidates = outputs.find_detections(scores, layout, grid, decision.candidate_threshold or 0.0, context=context,
                                         limit=cap)  # fmt: skip
    verified, valid = verifier.score(plan.inputs, grid, layout, [(d.x, d.y) for d in candidates], decision.shift)
    for detection, probability, ok in zip(candidates, verified, valid):
        if ok:
            detection.verifier_score = float(probability)
            detection.score = detection.verifier_score
    detections = outputs.rank([d for d in candidates if d.score >= decision.threshold])
    seconds = time.perf_counter() - t0
    report = {**verifier.describe(), "candidates": len(candidates), "candidate_cap": cap, "verified": int(valid.sum()),
              "unverifiable": int((~valid).sum()), "seconds": round(seconds, 3)}  # fmt: skip
    return detections, outputs.rank(list(candidates)), report


class _Prefetch(threading.Thread):
    """Calls ``function(*args)`` in the background; :meth:`result` waits and returns it (or raises its error)."""

    def __init__(self, function: Callable[..., Any], *args: Any):
        super().__init__(name="scan-prefetch", daemon=True)
        self.function, self.args = function, args
        self.value: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.function(*self.args)
        except BaseException as exc:  # raised by result(), in the scan's thread
            self.error = exc

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def _build_verifier(plan: _Plan, options: ScanOptions) -> Verifier:
    return Verifier(plan.decision.verify, plan.model, _resolve_device(options.device, "torch"), options.batch_size)


def run_scan(options: ScanOptions, log: Callable[[str], None] = lambda line: None) -> ScanResult:
    """Scans a region and writes every output into ``options.out``.

    Args:
        options: The scan's options.
        log: Receives a few progress lines.

    Returns:
        The scores, reasons, detections and the ``scan.json`` report.

    Raises:
        ConfigError: Invalid options, or ``--resume`` with other parameters.
        CheckpointError: Not a FusionNet checkpoint, or not of the preset asked for.
        InputError: A missing, unreadable or non-overlapping input, an output folder holding a previous scan,
            or a region where no chip can be scored.
        MissingDependencyError: A backend's, the Ray engine's or an output's package is missing.
    """
    t_start = time.perf_counter()
    _check_dependencies(options)
    out = Path(options.out)
    plan = _plan(options)
    before = _prepare_out(out, options.resume, options.overwrite)
    store = TileStore(out, _params(options, plan))
    store.start(options.resume)
    checksums = _Checksums(plan.inputs, options.checksums)
    checksums.start()
    collector = _Collector(plan.layout, store)
    todo = collector.resume(plan.tiles)
    resumed = len(plan.tiles) - len(todo)
    log(f"scan grid {plan.grid.width} x {plan.grid.height} px, {plan.layout.n_chips} chips of {plan.layout.chip_px} "
        f"px every {plan.layout.stride_px} px in {len(plan.tiles)} tiles ({resumed} done before)")  # fmt: skip
    if note := stride_note(plan.layout, plan.grid, options.stride_m):
        log(note)
    collector.start_bar(sum(t.n_chips for t in plan.tiles) - sum(t.n_chips for t in todo), options.progress)
    setup_s = time.perf_counter() - t_start
    ensemble = _Prefetch(_build_verifier, plan, options) if plan.decision.verify else None  # loads while scanning
    try:
        stats, backend = _run_engine(options, plan, todo, collector, out)
    except BaseException:
        _forget_unstarted(out, store, before)  # a scan that fails before its first tile leaves nothing
        raise
    finally:
        collector.close()
    _check_scored(collector, plan)
    t_out = time.perf_counter()
    report = _report(options, plan, checksums.join_result(), backend, resumed)
    scores = shift_scores(collector.scores, plan.decision.shift)
    detections, candidates, verifier = detect(scores, plan, options, ensemble.result() if ensemble else None)
    report["counts"] = _counts(collector, scores, detections, plan.decision)
    report["counts"]["area_km2"] = scanned_area_km2(scores, plan.layout, plan.grid)
    report["verifier"] = verifier or None
    _write_outputs(out, options, plan, scores, detections, report)
    last = (outputs.STAC_ITEM, outputs.SCAN_JSON)  # written by _write_report
    written = [n for n in outputs.FINAL_OUTPUTS if n not in last and (out / n).exists()]
    report["outputs"] = [*written, *last]
    report["timings"] = _timings(stats, setup_s, time.perf_counter() - t_out, time.perf_counter() - t_start)
    if verifier:
        report["timings"]["verify_s"] = verifier["seconds"]
    _write_report(out, report)
    return ScanResult(out, scores, collector.reasons, detections, report, collector.scores, plan.decision,
                      plan.grid, plan.layout, candidates, plan.inputs)  # fmt: skip


def _check_dependencies(options: ScanOptions) -> None:
    """Validates the options and imports what the outputs, the backend's engine and Ray need, before any work."""
    options.validate()
    outputs.require_pyarrow()
    if options.quicklook:
        outputs.require_matplotlib()
    if options.engine == "ray":
        from fusionkern.scan.ray_engine import require_ray

        require_ray()


def _check_scored(collector: _Collector, plan: _Plan) -> None:
    """A region where no chip could be scored is an error, not an empty map."""
    if (collector.reasons == SCORED).any():
        return
    counts = ", ".join(f"{int((collector.reasons == c).sum())} {n}" for c, n in REASONS.items())
    raise InputError(
        f"no chip of the region could be scored ({counts}): the inputs hold no valid data there "
        f"(first raster {plan.inputs.reference}); check the bounds, the nodata values and --max-invalid"
    )


def _describe_engine(options: ScanOptions, plan: _Plan, backend: dict[str, Any], resumed: int) -> dict[str, Any]:
    """The engine part of ``scan.json``; with Ray, the cluster (moved out of the backend's description): its nodes,
    actors per node, their devices, tiles per node, retries and lost actors."""
    cluster = backend.pop("cluster", None)
    workers = cluster["actors"] if cluster else _local_workers(options)
    return {
        "name": options.engine, "address": options.address, "workers": workers, "batch_size": options.batch_size,
        **({"readers": options.readers} if options.engine == "local" else {}),
        "tile_px": options.tile_px, "tile_chips": plan.tile_chips, "tiles": len(plan.tiles), "tiles_resumed": resumed,
        **({"cluster": cluster} if options.engine == "ray" else {}),
    }  # fmt: skip


def _report(
    options: ScanOptions, plan: _Plan, inputs: dict[str, Any], backend: dict[str, Any], resumed: int
) -> dict[str, Any]:
    """The parts of ``scan.json`` known before the outputs are written."""
    grid, layout = plan.grid, plan.layout
    return {
        "fusionkern_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {**inputs, "warped": [p for p in plan.inputs.rasters() if not on_grid(p, grid)]},
        "checkpoint": _describe_checkpoint(options, plan),
        "backend": backend,
        "engine": _describe_engine(options, plan, backend, resumed),
        "grid": grid.describe(),
        "chips": {**layout.describe(grid), "stride_m_requested": options.stride_m},
        "scores": {
            "transform": list(layout.score_transform(grid))[:6], "width": layout.n_cols, "height": layout.n_rows,
            "nodata": "nan",
        },  # fmt: skip
        "thresholds": {"detection": plan.decision.threshold, "max_invalid": options.max_invalid},
        "decision": plan.decision.describe(),
    }


__all__ = ["ENGINES", "ScanOptions", "ScanResult", "run_scan"]
