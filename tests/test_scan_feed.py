"""The scanner's feed: chips cut and scaled on the model's device (fusionkern.scan.feed) against the host path
and the training code, and tile windows read by worker processes (fusionkern.scan.procs)."""

from __future__ import annotations

import json
import os
import signal
import tracemalloc
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
import torch

import fusionkern.cli

from fusionkern.data.transforms import minmax_scale
from fusionkern.errors import ConfigError, InputError
from fusionkern.models import FusionNet
from fusionkern.scan.backends import TorchPredictor, load_scan_model, make_predictor
from fusionkern.scan.feed import ChipFeed, score_tile, uses_feed
from fusionkern.scan.grid import ChipLayout
from fusionkern.scan.engine import EngineOptions, run_local
from fusionkern.scan.procs import ReaderPool
from fusionkern.scan.tiles import NODATA, SCORED, chip_views
from test_scan import checkpoint, read_scores, scan, use_predictor, write_region  # noqa: F401 - module fixture

SCALE_ATOL = 3e-7
"""Scaled chips: float32 subtraction and division against float64 then rounding, on values in [0, 1]."""

SCORE_ATOL = 1e-5
"""Cement probabilities of the same model on chips scaled either way."""


def _layout(height: int, width: int, chip: int, stride: int) -> ChipLayout:
    return ChipLayout(chip, stride, (height - chip) // stride + 1, (width - chip) // stride + 1)


def _stack(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A window as the reader gives it: temperatures near 290 K, reflectances near 0.2, a ratio near 1."""
    stack = np.empty((5, 3, height, width), np.float32)
    for branch, (base, spread) in enumerate(((290, 8), (288, 8), (0.2, 0.1), (0.25, 0.1), (1.0, 0.4))):
        stack[branch] = base + spread * rng.standard_normal((3, height, width))
    return stack


def _host_chips(stack: np.ndarray, layout: ChipLayout, index: np.ndarray) -> np.ndarray:
    views = chip_views(stack, layout)
    return minmax_scale(np.stack([views[:, :, i // layout.n_cols, i % layout.n_cols] for i in index]))


@pytest.mark.parametrize(
    "height, width, chip, stride, order",
    [(70, 53, 35, 17, "sorted"), (101, 88, 35, 17, "shuffled"), (41, 29, 9, 4, "sorted"), (35, 35, 35, 17, "one")],
)
def test_device_chips_match_the_training_scaling(height, width, chip, stride, order):
    rng = np.random.default_rng()
    stack = _stack(rng, height, width)
    stack[3, 2, :chip, :chip] = 0.3  # a constant plane in the first chip: scales to 0
    layout = _layout(height, width, chip, stride)
    n = layout.n_chips
    index = {"sorted": np.union1d([0], rng.choice(n, max(1, n // 2), replace=False)), "shuffled": rng.permutation(n),
             "one": np.array([0])}[order]  # fmt: skip
    feed = ChipFeed(layout)
    got = feed.chips(feed.load(stack), index, layout.n_cols).numpy()
    want = _host_chips(stack, layout, index)
    assert got.shape == want.shape == (len(index), 5, 3, chip, chip)
    np.testing.assert_allclose(got, want, rtol=0, atol=SCALE_ATOL)
    assert got.min() >= 0 and got.max() <= 1
    assert not got[list(index).index(0), 3, 2].any()


def test_device_chips_leave_out_invalid_pixels_as_training_does():
    rng = np.random.default_rng()
    stack = _stack(rng, 61, 70)
    stack[0, 1, 3:9, 5:7] = np.nan  # a few invalid pixels in some chips
    stack[2, :, :, :12] = np.nan  # whole planes of the first column of chips
    stack[4, 0, 20, 30] = np.inf
    stack[1, 2, 40:, 48:] = 0.3  # a constant plane in the last chip (rows 40-56, columns 48-64) ...
    stack[1, 2, 45, 60] = np.nan  # ... with an invalid pixel: still all 0
    before = stack.copy()
    layout = _layout(61, 70, 17, 8)
    index = np.union1d([layout.n_chips - 1], rng.permutation(layout.n_chips)[:23])
    feed = ChipFeed(layout)
    tile = feed.load(stack)
    assert not tile.finite
    got = feed.chips(tile, index, layout.n_cols).numpy()
    np.testing.assert_allclose(got, _host_chips(stack, layout, index), rtol=0, atol=SCALE_ATOL)
    assert np.isfinite(got).all() and got.min() >= 0 and got.max() <= 1
    assert not got[-1, 1, 2].any()
    np.testing.assert_array_equal(stack, before)  # the reader's window is left as it was


def test_the_feed_writes_every_batch_into_one_buffer():
    rng = np.random.default_rng()
    stack = _stack(rng, 35 + 17 * 6, 35 + 17 * 5)
    stack[1, 2, 40:44, 50:52] = np.nan  # a mask buffer too
    layout = _layout(*stack.shape[-2:], 35, 17)
    feed = ChipFeed(layout)
    tile = feed.load(stack)
    first = rng.choice(layout.n_chips, 9, replace=False)
    second = rng.choice(layout.n_chips, 5, replace=False)
    third = rng.permutation(layout.n_chips)  # larger than any before: a larger buffer
    a = feed.chips(tile, first, layout.n_cols)
    np.testing.assert_allclose(a.numpy(), _host_chips(stack, layout, first), rtol=0, atol=SCALE_ATOL)
    b = feed.chips(tile, second, layout.n_cols)
    assert b.data_ptr() == a.data_ptr()  # the same memory: the previous batch is gone, as documented
    for index in (second, third, first):
        got = feed.chips(tile, index, layout.n_cols).numpy()
        np.testing.assert_allclose(got, _host_chips(stack, layout, index), rtol=0, atol=SCALE_ATOL)


def test_reader_threads_reuse_a_bounded_set_of_window_buffers(tmp_path, monkeypatch):
    import fusionkern.scan.engine as engine

    made = []

    class Counted(engine._Windows):
        def __init__(self, limit, size):
            super().__init__(limit, size)
            made.append(self)

    monkeypatch.setattr(engine, "_Windows", Counted)
    setup = _pool_setup(tmp_path)
    assert len(setup.tiles) >= 12
    fresh = run_local(setup.inputs, setup.grid, setup.layout, setup.tiles, _FeedMean(), EngineOptions(workers=1))
    scores = {}
    stats = run_local(setup.inputs, setup.grid, setup.layout, setup.tiles, _FeedMean(),
                      EngineOptions(batch_size=16, workers=2, readers="threads"),
                      on_tile=lambda r: scores.setdefault(r.tile.key, r.scores.copy()))  # fmt: skip
    pools = made[-1], made[0]
    assert stats.tiles == fresh.tiles == len(setup.tiles) and stats.scored == fresh.scored > 0
    assert pools[0].limit == 5 and 1 <= pools[0].made <= 5 and pools[1].made <= 3  # 2 readers: 2 + 2 + 1


    class OnHost(_FeedMean):  # host chips from windows read into new arrays
        score_tensor = None

    fresh_windows = {}
    run_local(setup.inputs, setup.grid, setup.layout, setup.tiles, OnHost(), EngineOptions(workers=2),
              on_tile=lambda r: fresh_windows.setdefault(r.tile.key, r.scores.copy()))  # fmt: skip
    assert len(made) == 3 and made[-1].made == 0
    for key, value in scores.items():  # nothing of an earlier window is left in a reused buffer
        np.testing.assert_allclose(value, fresh_windows[key], rtol=0, atol=SCALE_ATOL)


def test_scores_on_device_chips_match_host_chips():
    torch.manual_seed(int(np.random.default_rng().integers(1 << 16)))
    model = FusionNet(preset="native", width=0.25).eval()
    rng = np.random.default_rng()
    stack = _stack(rng, 35 + 17 * 4, 35 + 17 * 5)
    layout = _layout(*stack.shape[-2:], 35, 17)
    reasons = np.full((layout.n_rows, layout.n_cols), SCORED, np.uint8)
    reasons[1, 2] = reasons[3, 0] = NODATA
    predictor = TorchPredictor(model, "cpu")
    assert uses_feed(predictor)
    scores, cut_s, infer_s = score_tile(ChipFeed(layout), predictor, stack, reasons, batch_size=7)
    scored = np.flatnonzero(reasons.ravel() == SCORED)
    want = predictor(_host_chips(stack, layout, scored))
    np.testing.assert_allclose(scores.ravel()[scored], want, rtol=0, atol=SCORE_ATOL)
    assert np.isnan(scores[1, 2]) and np.isnan(scores[3, 0]) and cut_s > 0 and infer_s > 0


class _HostOnly:
    """The same model, fed chips cut and scaled on the host (no ``score_tensor``)."""

    expects_raw = False

    def __init__(self, predictor: TorchPredictor):
        self.predictor = predictor

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        return self.predictor(chips)

    def describe(self) -> dict:
        return {"name": "host", "device": "cpu"}


def test_a_scan_fed_on_the_device_equals_a_scan_fed_on_the_host(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    manifest = write_region(tmp_path / "region", height=150, width=171, seed=int(np.random.default_rng().integers(99)))
    device_fed = TorchPredictor(load_scan_model(checkpoint, backend="torch"), "cpu")
    use_predictor(monkeypatch, device_fed)
    scan(tmp_path, checkpoint, "device", manifest=str(manifest), tile_px=96, batch_size=5, quicklook=False)
    use_predictor(monkeypatch, _HostOnly(device_fed))
    scan(tmp_path, checkpoint, "host", manifest=str(manifest), tile_px=96, batch_size=5, quicklook=False)
    on_device, _ = read_scores(tmp_path / "device")
    on_host, _ = read_scores(tmp_path / "host")
    assert np.isfinite(on_device).sum() == np.isfinite(on_host).sum() > 0
    np.testing.assert_allclose(on_device, on_host, rtol=0, atol=SCORE_ATOL)


class _FeedMean:
    """A cheap predictor that takes device chips: the mean of each chip's first plane."""

    expects_raw = False
    feed_device = torch.device("cpu")

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        return chips[:, 0, 0].mean(axis=(1, 2)).astype(np.float32)

    def score_tensor(self, x: torch.Tensor) -> np.ndarray:
        return x[:, 0, 0].mean(dim=(1, 2)).numpy()

    def describe(self) -> dict:
        return {"name": "feed-mean", "device": "cpu"}


def _peak(tmp_path: Path, checkpoint: Path, side: int) -> tuple[int, int]:  # noqa: F811
    manifest = write_region(tmp_path / f"region{side}", height=side, width=side)
    tracemalloc.start()
    try:
        scan(tmp_path, checkpoint, f"out{side}", manifest=str(manifest), tile_px=128, batch_size=8, workers=2,
             quicklook=False, checksums=False)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, 12 * side * side * 4


def test_memory_stays_bounded_when_whole_windows_go_to_the_device(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    use_predictor(monkeypatch, _FeedMean())
    _peak(tmp_path, checkpoint, 100)  # imports, outside the measurements
    small_peak, _ = _peak(tmp_path, checkpoint, 300)
    large_peak, large_bytes = _peak(tmp_path, checkpoint, 1000)  # 11 times the pixels
    assert large_peak < large_bytes / 4, f"peak {large_peak / 1e6:.1f} MB for {large_bytes / 1e6:.1f} MB of rasters"
    assert large_peak < 1.5 * small_peak + 2e6, f"peak grew from {small_peak / 1e6:.1f} to {large_peak / 1e6:.1f} MB"


def test_fixed_shapes_and_bf16_are_for_cuda_only():
    model = FusionNet(preset="native", width=0.25).eval()
    predictor = TorchPredictor(model, "cpu", graphs=True)
    assert not predictor.graphs and predictor.describe()["fixed_batch"] is None
    with pytest.raises(ConfigError, match="bf16 needs a CUDA device"):
        TorchPredictor(model, "cpu", precision="bf16")
    with pytest.raises(ConfigError, match="precision must be"):
        TorchPredictor(model, "cpu", precision="fp8")


def test_precision_is_checked_per_backend(checkpoint, tmp_path, capsys):  # noqa: F811
    model = FusionNet(preset="native", width=0.25).eval()
    with pytest.raises(ConfigError, match="onnxruntime backend runs fp32 only"):
        make_predictor("onnxruntime", model, "cpu", tmp_path, precision="bf16")
    with pytest.raises(ConfigError, match="fp16 or fp32 for the tensorrt"):
        make_predictor("tensorrt", model, "cpu", tmp_path, precision="bf16")
    manifest = write_region(tmp_path / "region", height=80, width=80)
    out = tmp_path / "out"
    code = fusionkern.cli.main(["scan", str(checkpoint), "--manifest", str(manifest), "--out", str(out),
                                "--precision", "bf16", "--device", "cpu", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bf16 needs a CUDA device" in err
    assert not (out / "scores.tif").exists()


# --------------------------------------------------------------------------------------------------------------
# Reader processes
# --------------------------------------------------------------------------------------------------------------


def test_reader_processes_give_the_scores_of_reader_threads(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    manifest = write_region(tmp_path / "region", height=230, width=201, seed=int(np.random.default_rng().integers(99)),
                            qa_box=(10, 40, 150, 190))  # fmt: skip
    use_predictor(monkeypatch, _FeedMean())
    for readers, workers in (("threads", 2), ("processes", 3)):
        scan(tmp_path, checkpoint, readers, manifest=str(manifest), tile_px=64, batch_size=9, quicklook=False,
             readers=readers, workers=workers)  # fmt: skip
    threads, _ = read_scores(tmp_path / "threads")
    processes, _ = read_scores(tmp_path / "processes")
    assert np.isfinite(threads).sum() > 0 and np.isnan(threads).sum() > 0  # the cloud box is skipped
    np.testing.assert_array_equal(processes, threads)
    engine = json.loads((tmp_path / "processes" / "scan.json").read_text())["engine"]
    assert engine["readers"] == "processes" and engine["workers"] == 3


def _pool_setup(tmp_path: Path, side: int = 300):
    from fusionkern.scan.engine import _setup

    manifest = write_region(tmp_path / "region", height=side, width=side)
    return _setup(manifest, 35 * 30.0, 64, None)


def test_reader_pool_holds_two_windows_per_worker_and_frees_its_memory(tmp_path):
    setup = _pool_setup(tmp_path)
    with ReaderPool(setup.inputs, setup.grid, setup.layout, setup.tiles, workers=2, max_invalid=0.0) as pool:
        names = [slot.name for slot in pool.slots]
        described = pool.describe()
        seen = [window.tile.key for window in pool.windows()]
    assert described["slots"] == 4 and described["workers"] == 2
    assert sorted(seen) == sorted(tile.key for tile in setup.tiles) and len(seen) > 4
    for name in names:  # unlinked
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)


def test_a_reader_process_that_dies_is_reported(tmp_path):
    setup = _pool_setup(tmp_path)
    assert len(setup.tiles) > 2  # more tiles than the one worker's two slots: the rest wait for a slot
    with ReaderPool(setup.inputs, setup.grid, setup.layout, setup.tiles, workers=1, max_invalid=0.0) as pool:
        for process in pool.processes:
            os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="reader process .* died"):
            for _ in pool.windows():
                pass


def test_an_unreadable_raster_in_a_reader_process_is_an_error(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    manifest = write_region(tmp_path / "region", height=200, width=200)
    bad = tmp_path / "region" / "b10_2.tif"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    use_predictor(monkeypatch, _FeedMean())
    with pytest.raises(InputError, match=str(bad)):
        scan(tmp_path, checkpoint, manifest=str(manifest), tile_px=64, quicklook=False, readers="processes", workers=2)
    assert not (tmp_path / "out" / "scores.tif").exists()


def test_the_gpu_check_parity_of_the_scan_feed_runs_on_the_cpu_too():
    from fusionkern.bench.cases import build_fusionnet, scan_feed_parity

    model = build_fusionnet("native", 0.25)
    seed = int(np.random.default_rng().integers(99))
    parity = scan_feed_parity(TorchPredictor(model, "cpu"), 35, batch_size=10, seed=seed)
    assert parity["feed_parity_chips"] == 63 and parity["feed_parity_max_abs"] <= SCORE_ATOL
    assert scan_feed_parity(_FeedMean(), 35, batch_size=10)["feed_parity"].startswith("n/a")


def test_a_shared_memory_too_small_for_reader_processes_falls_back_to_threads(tmp_path, monkeypatch):
    setup = _pool_setup(tmp_path)
    real = os.statvfs

    class Tiny:  # a /dev/shm with 64 KiB free, smaller than four of these (small) windows
        f_bavail, f_frsize = 16, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Tiny() if str(path) == "/dev/shm" else real(path))
    with pytest.raises(ConfigError, match=r"--readers threads.*--shm-size"):
        ReaderPool(setup.inputs, setup.grid, setup.layout, setup.tiles, workers=2, max_invalid=0.0)
    with pytest.warns(RuntimeWarning, match="reading with threads instead"):
        stats = run_local(setup.inputs, setup.grid, setup.layout, setup.tiles, _FeedMean(),
                          EngineOptions(batch_size=16, workers=2, readers="processes"))  # fmt: skip
    assert stats.readers == "threads" and stats.tiles == len(setup.tiles) and stats.scored > 0


def test_reader_processes_stop_when_their_scanning_process_dies(tmp_path):
    manifest = write_region(tmp_path / "region", height=300, width=300)
    script = tmp_path / "scan_and_die.py"
    script.write_text(
        "import os, sys\n"
        "from fusionkern.scan.engine import _setup\n"
        "from fusionkern.scan.procs import ReaderPool\n"
        "if __name__ == '__main__':\n"
        f"    setup = _setup({str(manifest)!r}, 1050.0, 64, None)\n"
        "    pool = ReaderPool(setup.inputs, setup.grid, setup.layout, setup.tiles, 2, 0.0).__enter__()\n"
        "    print(' '.join(str(p.pid) for p in pool.processes), flush=True)\n"
        "    os._exit(0)  # no clean-up: as if killed\n"
    )
    import subprocess
    import sys
    import time as _time

    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 2
    deadline = _time.monotonic() + 30
    while _time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        _time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "reader processes outlived their scanning process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead, waiting for its parent to reap it
        return stat.read().split(")")[-1].split()[0] != "Z"
