"""Reader processes: tile windows read, decompressed, calibrated and masked in worker processes, handed over in
shared memory.

Threads share one interpreter: the Python between GDAL calls (calibration, masks, the B7:B6 ratio) takes turns
under the GIL, so a many-core machine cannot read faster than one core runs that Python. Here each worker process
holds its own open rasters (:class:`~fusionkern.scan.tiles.StackReader`) and writes each window straight into a
shared-memory slot; the scanning process gets the slot's number, the chip reasons and the read time over a queue,
scores the window in place and gives the slot back. There are two slots per worker, so memory is
``2 x workers`` tile windows whatever the size of the region, and reading the next window overlaps scoring this
one.

Workers start from a fork server (a clean interpreter that imports this module once, then forks; ``spawn`` where
there is none), never by forking the scanning process, whose torch threads and open GDAL handles a fork would copy
half-way. A worker that fails reports the error (an unreadable raster names its file) and the scan raises it; a
worker that dies outright (killed, out of memory) is noticed within half a second, and workers whose scanning
process died stop by themselves.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Iterator, Sequence

import numpy as np

from fusionkern import BRANCHES
from fusionkern.errors import ConfigError, FusionkernError
from fusionkern.readers import N_DATES
from fusionkern.scan.grid import ChipLayout, ScanGrid
from fusionkern.scan.inputs import ScanInputs
from fusionkern.scan.tiles import StackReader, Tile, chip_reasons, cloud_as_nan

_POLL_S = 0.5
_JOIN_S = 5.0


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _context() -> Any:
    if "forkserver" in mp.get_all_start_methods():
        context = mp.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # only takes effect before the server's first start
        return context
    return mp.get_context("spawn")


@dataclass
class Window:
    """One tile window in shared memory, valid until the consumer asks for the next.

    Attributes:
        tile: The tile.
        stack: (5, 3, H, W) float32 view of the slot, NaN at invalid and cloudy pixels.
        reasons: (rows, cols) per chip SCORED / NODATA / CLOUD / OUTSIDE.
        read_s: Seconds the worker spent reading, calibrating and masking it.
    """

    tile: Tile
    stack: np.ndarray
    reasons: np.ndarray
    read_s: float


class ReaderPool:
    """Worker processes reading the windows of ``tiles`` into shared memory, in completion order.

    Args:
        inputs: The rasters.
        grid: The scan grid.
        layout: The chips.
        tiles: The tiles to read.
        workers: Processes (at most one per tile).
        max_invalid: Largest invalid fraction of a chip that is still scored.
    """

    def __init__(
        self,
        inputs: ScanInputs,
        grid: ScanGrid,
        layout: ChipLayout,
        tiles: Sequence[Tile],
        workers: int,
        max_invalid: float,
    ):
        self.layout = layout
        self.todo = list(reversed(tiles))
        self.n_workers = max(1, min(int(workers), len(tiles)))
        heights, widths = zip(*(tile.window(layout)[2:] for tile in tiles)) if tiles else ((1,), (1,))
        self.slot_bytes = len(BRANCHES) * N_DATES * max(heights) * max(widths) * 4
        _check_shared_memory(2 * self.n_workers * self.slot_bytes, self.n_workers)
        context = _context()
        self.tasks, self.results = context.Queue(), context.Queue()
        self.slots: list[shared_memory.SharedMemory] = []
        self.processes: list[Any] = []
        try:
            for _ in range(2 * self.n_workers):
                self.slots.append(shared_memory.SharedMemory(create=True, size=self.slot_bytes))
            names = [slot.name for slot in self.slots]
            args = (inputs.to_dict(), grid, layout, max_invalid, names, self.tasks, self.results)
            self.processes = [
                context.Process(target=_work, args=args, name=f"scan-reader-{i}", daemon=True)
                for i in range(self.n_workers)
            ]
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ReaderPool:
        try:
            for process in self.processes:
                process.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """Readers, for ``scan.json``."""
        return {"readers": "processes", "workers": self.n_workers, "slots": len(self.slots),
                "slot_mib": round(self.slot_bytes / 2**20, 1)}  # fmt: skip

    def windows(self) -> Iterator[Window]:
        """Every tile's window as it is read; the slot is reused once the consumer asks for the next.

        Raises:
            Whatever a worker raised (an unreadable raster: InputError naming it); RuntimeError where a worker
            died without a word.
        """
        pending = 0
        for slot in range(len(self.slots)):
            pending += self._submit(slot)
        while pending:
            message = self._receive()
            pending -= 1
            fields, slot, reasons, read_s = message
            tile = Tile(*fields)
            _, _, height, width = tile.window(self.layout)
            stack = _view(self.slots[slot], height, width)
            yield Window(tile, stack, reasons, read_s)
            del stack
            pending += self._submit(slot)

    def _submit(self, slot: int) -> int:
        if not self.todo:
            return 0
        tile = self.todo.pop()
        self.tasks.put(((tile.ti, tile.tj, tile.row0, tile.col0, tile.rows, tile.cols), slot))
        return 1

    def _receive(self) -> tuple[Any, ...]:
        while True:
            try:
                kind, payload = self.results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"scan reader process {dead[0].name} died (exit code {dead[0].exitcode}); "
                        "out of memory? try a smaller --tile-px or fewer --workers"
                    ) from None
                continue
            if kind == "error":
                raise pickle.loads(payload)
            return payload

    def close(self) -> None:
        """Stops the workers and frees the shared memory."""
        for _ in self.processes:
            try:
                self.tasks.put(None)
            except (OSError, ValueError):
                break
        deadline = time.monotonic() + _JOIN_S
        for process in self.processes:
            if process.pid is None:  # never started
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(1.0)
        for channel in (self.tasks, self.results):
            channel.close()
            channel.cancel_join_thread()
        for slot in self.slots:
            try:
                slot.close()
            except BufferError:  # a view of it is still referenced; the mapping goes when that does
                pass
            try:
                slot.unlink()
            except FileNotFoundError:
                pass
        self.slots, self.processes = [], []


class SharedMemoryTooSmall(ConfigError):
    """The shared-memory filesystem cannot hold the reader processes' windows."""


def _check_shared_memory(needed: int, workers: int, folder: str = "/dev/shm") -> None:
    """Refuses to start where the shared-memory filesystem cannot hold the slots (a container's default 64 MB):
    a worker writing past it would die of SIGBUS halfway through the scan.

    Raises:
        SharedMemoryTooSmall: Not enough free space, with what to change.
    """
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # no such filesystem here: nothing to check
        return
    free = stats.f_bavail * stats.f_frsize
    if needed > free:
        raise SharedMemoryTooSmall(
            f"reader processes need {needed / 2**20:.0f} MiB of shared memory ({workers} worker(s) x 2 tile "
            f"windows) but {folder} has {free / 2**20:.0f} MiB free: use --readers threads, fewer --workers or a "
            "smaller --tile-px, or give the machine more shared memory (docker run --shm-size)"
        )


def _view(slot: shared_memory.SharedMemory, height: int, width: int) -> np.ndarray:
    shape = (len(BRANCHES), N_DATES, height, width)
    return np.ndarray(shape, dtype=np.float32, buffer=slot.buf)


def _attach(name: str) -> shared_memory.SharedMemory:
    """Opens a slot the scanning process created. Workers share its resource tracker, so the slot stays
    registered once and the creator's unlink is its only clean-up."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python 3.13 and later
    except TypeError:
        return shared_memory.SharedMemory(name=name)


def _work(
    inputs: dict[str, Any],
    grid: ScanGrid,
    layout: ChipLayout,
    max_invalid: float,
    names: list[str],
    tasks: Any,
    results: Any,
) -> None:
    """A worker: reads the windows it is asked for into the slots it is told, until it gets None."""
    slots = [_attach(name) for name in names]
    try:
        scanning = mp.parent_process()  # the scanning process (the fork server is only this one's OS parent)
        with StackReader(ScanInputs.from_dict(inputs), grid, layout) as reader:
            while True:
                try:
                    task = tasks.get(timeout=_POLL_S)
                except queue.Empty:
                    if scanning is not None and not scanning.is_alive():
                        break  # it died without a word: nobody will ask for more
                    continue
                if task is None:
                    break
                fields, slot = task
                results.put(("tile", _read(reader, layout, max_invalid, Tile(*fields), slots[slot], fields, slot)))
    except BaseException as exc:
        results.put(("error", _portable(exc)))
    finally:
        for slot in slots:
            slot.close()


def _read(
    reader: StackReader,
    layout: ChipLayout,
    max_invalid: float,
    tile: Tile,
    slot: shared_memory.SharedMemory,
    fields: tuple[int, ...],
    index: int,
) -> tuple[Any, ...]:
    t0 = time.perf_counter()
    top, left, height, width = tile.window(layout)
    data = reader.read(top, left, height, width, out=_view(slot, height, width))
    reasons = chip_reasons(data, tile, layout, max_invalid)
    cloud_as_nan(data)
    return fields, index, reasons, time.perf_counter() - t0


def _portable(exc: BaseException) -> bytes:
    """The exception pickled, or a RuntimeError carrying its message where it does not pickle."""
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
        return blob
    except Exception:
        kind = FusionkernError if isinstance(exc, FusionkernError) else RuntimeError
        return pickle.dumps(kind(f"{type(exc).__name__}: {exc}"))
