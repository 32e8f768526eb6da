"""Chips cut and scaled where the model runs.

A tile window of the scan (5 branches x 3 dates x H x W, float32, NaN at invalid pixels) is handed to the
predictor's device once; its chips are views of it (``Tensor.unfold``), and each chip channel's minimum and maximum
come from one sliding max-pool over the whole window (kernel = chip, stride = stride), exact in float32. A batch is
then one gather and one fused affine map: no chip is copied on the host, and a scaled float32 chip (73 KB at 35 px)
never crosses PCIe, only the window's pixels (about 7 KB per chip at half-chip stride).

Scaling matches :func:`fusionkern.data.transforms.minmax_scale` (each (H, W) plane to its own min..max, 0 at
invalid pixels and on constant or empty planes) within float32 rounding: the minimum and maximum are exact, the
subtraction and division are done in float32 instead of float64, which moves a value by at most a few units in the
last place (below 3e-7 on values in [0, 1]; ``tests/test_scan_feed.py`` pins it).

On CUDA the window goes through a pinned staging buffer and a side stream, so the copy of one tile overlaps the
model on the previous one; on a CPU the same torch code runs vectorised in float32 instead of numpy's float64.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fusionkern.scan.grid import ChipLayout
from fusionkern.scan.tiles import SCORED


@dataclass
class DeviceTile:
    """A tile window on the feed's device.

    Attributes:
        planes: (15, H, W) float32 window (branch-major, then date), NaN at invalid pixels.
        views: (rows, cols, 15, S, S) chip views of ``planes`` (no copy).
        lo: (rows, cols, 15, 1, 1) each chip plane's minimum over its finite pixels (0 where it has none).
        span: (rows, cols, 15, 1, 1) maximum minus minimum (1 where the plane is constant or empty: it scales to 0).
        invalid: Where the window held NaN (or inf): (rows, cols, 15, S, S) bool chip views of the invalid pixels,
            whose values in ``planes`` were replaced by 0 once for the window; None when it held none.
    """

    planes: torch.Tensor
    views: torch.Tensor
    lo: torch.Tensor
    span: torch.Tensor
    invalid: torch.Tensor | None = None

    @property
    def finite(self) -> bool:
        """True when the window held no NaN (the gather then needs no mask)."""
        return self.invalid is None


class ChipFeed:
    """Cuts and scales the chips of tile windows on a torch device.

    Args:
        layout: Chip size and stride on the scan grid.
        device: Where the chips are made (the model's device).
    """

    def __init__(self, layout: ChipLayout, device: torch.device | str = "cpu"):
        self.chip_px, self.stride_px = layout.chip_px, layout.stride_px
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._staging: list[torch.Tensor] = []
        self._staged: list[torch.cuda.Event | None] = []
        self._turn = 0
        self._batch = torch.empty(0, dtype=torch.float32, device=self.device)
        self._invalid = torch.empty(0, dtype=torch.bool, device=self.device)

    def load(self, stack: np.ndarray) -> DeviceTile:
        """Puts one tile window on the device and computes its chips' minima and maxima.

        Args:
            stack: (5, 3, H, W) float32, NaN at invalid pixels; H and W at least one chip.
        """
        planes_np = np.ascontiguousarray(stack, dtype=np.float32).reshape(-1, *stack.shape[-2:])
        if not self._cuda:
            return self._bounds(torch.from_numpy(planes_np))
        planes, ready = self._to_cuda(planes_np)
        torch.cuda.current_stream(self.device).wait_event(ready)
        return self._bounds(planes)

    def _bounds(self, planes: torch.Tensor) -> DeviceTile:
        c, s = self.chip_px, self.stride_px

        def pooled(x: torch.Tensor, reduce: str) -> torch.Tensor:  # (15, H, W) -> (15, rows, cols), exact
            return getattr(getattr(x.unfold(1, c, s), reduce)(-1).unfold(2, c, s), reduce)(-1)

        hi, lo = pooled(planes, "amax"), pooled(planes, "amin")  # NaN or inf reaches them from any chip holding one
        finite = bool(torch.isfinite(hi).all() and torch.isfinite(lo).all())
        invalid = None
        if not finite:
            inf = float("inf")
            hi = pooled(torch.nan_to_num(planes, nan=-inf, posinf=-inf, neginf=-inf), "amax")  # invalid: ignored
            lo = pooled(torch.nan_to_num(planes, nan=inf, posinf=inf, neginf=inf), "amin")
            has_data = torch.isfinite(lo)
            lo, hi = torch.where(has_data, lo, 0.0), torch.where(has_data, hi, 0.0)
            # once per window, not per chip (each pixel lies in about four chips): invalid pixels become 0 and a
            # mask, so a batch is cut and scaled as a finite one and then has its invalid pixels zeroed
            invalid = _chip_views(torch.isnan(planes - planes), c, s)  # NaN and +-inf (faster than isfinite)
            planes = torch.nan_to_num(planes, nan=0.0, posinf=0.0, neginf=0.0)
        span = hi - lo
        span = torch.where(torch.isfinite(span) & (span > 0), span, 1.0)  # constant or empty planes scale to 0

        def chip_major(t: torch.Tensor) -> torch.Tensor:
            return t.permute(1, 2, 0)[..., None, None]

        return DeviceTile(planes, _chip_views(planes, c, s), chip_major(lo), chip_major(span), invalid)

    def chips(self, tile: DeviceTile, index: np.ndarray, cols: int) -> torch.Tensor:
        """The scaled chips ``index`` (flat, row-major over ``cols`` chip columns) of a loaded tile.

        The batch is written into one buffer the feed keeps (a fresh 19 MB batch of 256 chips would be new pages
        from the kernel, zeroed on first touch, every call): it holds until the next call, which overwrites it. On
        CUDA that next write is queued on the same stream, after whatever the model queued on this batch.

        Returns:
            (B, 5, 3, S, S) float32 in [0, 1] on the device.
        """
        index = np.asarray(index, dtype=np.int64)
        c = self.chip_px
        shape = (len(index), tile.views.shape[2], c, c)
        self._batch, x = _buffer(self._batch, shape)
        flat = torch.from_numpy(index).to(self.device, non_blocking=True)
        rows, columns = flat // cols, flat % cols
        lo, span = tile.lo[rows, columns], tile.span[rows, columns]
        invalid = None
        if tile.invalid is not None:
            self._invalid, invalid = _buffer(self._invalid, shape)
        done = 0
        for row, first, count in _runs(index, cols):  # a few runs of neighbouring chips per batch
            part = slice(done, done + count)
            torch.sub(tile.views[row, first : first + count], lo[part], out=x[part])  # cut and subtract in one pass
            if invalid is not None:
                invalid[part].copy_(tile.invalid[row, first : first + count])
            done += count
        # lo <= x <= lo + span at valid pixels, so (x - lo) / span lies in [0, 1]; a constant plane gives 0, and
        # invalid pixels (0 in the window, whatever that scales to) are zeroed, as are planes without data
        x.div_(span)
        if invalid is not None:
            x.masked_fill_(invalid, 0.0)
        return x.view(len(index), -1, 3, c, c)

    def _to_cuda(self, planes_np: np.ndarray) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Copies through one of two pinned buffers on the side stream; waits for that buffer's previous copy."""
        turn = self._turn = (self._turn + 1) % 2
        while len(self._staging) <= turn:
            self._staging.append(torch.empty(0, dtype=torch.float32))
            self._staged.append(None)
        if self._staged[turn] is not None:
            self._staged[turn].synchronize()  # the buffer's previous copy has left it
        self._staging[turn], host = _buffer(self._staging[turn], planes_np.shape, pin=True)
        host.numpy()[...] = planes_np
        with torch.cuda.stream(self._stream):
            planes = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        planes.record_stream(torch.cuda.current_stream(self.device))
        self._staged[turn] = event
        return planes, event


def _buffer(buffer: torch.Tensor, shape: tuple[int, ...], pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat buffer, contiguous shape view of it)``: ``buffer`` (1-D), or a new one where it is too small (in
    pinned host memory with ``pin``)."""
    n = int(np.prod(shape))
    if buffer.numel() < n:
        buffer = torch.empty(n, dtype=buffer.dtype, device=buffer.device, pin_memory=pin)
    return buffer, buffer[:n].view(shape)


def _chip_views(planes: torch.Tensor, chip_px: int, stride_px: int) -> torch.Tensor:
    """(15, H, W) -> (rows, cols, 15, S, S) chip views, chip-major: a batch gathers straight into (B, 15, S, S)."""
    return planes.unfold(1, chip_px, stride_px).unfold(2, chip_px, stride_px).permute(1, 2, 0, 3, 4)


def _runs(index: np.ndarray, cols: int) -> list[tuple[int, int, int]]:
    """``(row, first column, count)`` of each run of consecutive chips of one chip row in ``index``."""
    if len(index) == 0:
        return []
    rows, columns = np.divmod(index, cols)
    breaks = np.flatnonzero((np.diff(index) != 1) | (np.diff(rows) != 0)) + 1
    starts = np.concatenate(([0], breaks))
    counts = np.diff(np.concatenate((starts, [len(index)])))
    return list(zip(rows[starts].tolist(), columns[starts].tolist(), counts.tolist()))


def uses_feed(predictor: Any) -> bool:
    """Whether a predictor takes chips cut and scaled on its device (``score_tensor`` and ``feed_device``)."""
    return callable(getattr(predictor, "score_tensor", None)) and getattr(predictor, "feed_device", None) is not None


def score_tile(
    feed: ChipFeed, predictor: Any, stack: np.ndarray, reasons: np.ndarray, batch_size: int
) -> tuple[np.ndarray, float, float]:
    """Scores one tile window's scorable chips on the predictor's device, in the batches
    :func:`fusionkern.scan.tiles.chip_batches` would make (row-major, ``batch_size`` at a time).

    Args:
        feed: The chip feed on the predictor's device.
        predictor: Has ``score_tensor``.
        stack: (5, 3, H, W) float32 window, NaN at invalid pixels (cloud included).
        reasons: (rows, cols) per chip SCORED / NODATA / CLOUD / OUTSIDE.
        batch_size: Chips per model call.

    Returns:
        ``(scores, cut_s, inference_s)``: (rows, cols) float32 probabilities (NaN where not scored) and the
        seconds spent cutting and scaling and in the model (on CUDA the two overlap; the model's share then
        includes waiting for the cut).
    """
    scores = np.full(reasons.shape, np.nan, dtype=np.float32)
    flat = np.flatnonzero(reasons.ravel() == SCORED)
    if len(flat) == 0:
        return scores, 0.0, 0.0
    t0 = time.perf_counter()
    tile = feed.load(stack)
    cut_s, infer_s = time.perf_counter() - t0, 0.0
    cols = reasons.shape[1]
    for start in range(0, len(flat), batch_size):
        index = flat[start : start + batch_size]
        t1 = time.perf_counter()
        chips = feed.chips(tile, index, cols)
        t2 = time.perf_counter()
        scores.flat[index] = predictor.score_tensor(chips)
        cut_s, infer_s = cut_s + t2 - t1, infer_s + time.perf_counter() - t2
    return scores, cut_s, infer_s
