"""Per-chip scaling and the paper's geometric augmentation, applied to all inputs of a site at once.

Two scalings bring a chip's bands to the model's input range:

* ``minmax`` (:func:`minmax_scale`; the paper's, and the scanner's): each channel of each chip to its own
  min..max. Shapes survive, magnitudes do not: a 3 K hot spot on a calm background looks like a 9 K one.
* ``physical`` (:func:`physical_scale`): the bands in their physical units by a fixed affine map per band, the
  thermal bands relative to the chip's median. A model trained on it can tell a kiln's heat in kelvin and a dust
  halo's reflectance, which separate cement works from other heavy industry; it serves as a verifier of the
  scanner's candidates (:mod:`fusionkern.scan.decide`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from fusionkern.errors import ConfigError

ChipT = TypeVar("ChipT", np.ndarray, torch.Tensor)


def minmax_scale(x: np.ndarray) -> np.ndarray:
    """Scale each channel of a chip to its own min..max, as the authors do.

    Every (H, W) plane of ``x`` is mapped to [0, 1] from its finite minimum and maximum. Non-finite pixels
    (NaN nodata, infinities) are ignored for the range and set to 0 afterwards; a constant or entirely
    non-finite plane becomes all 0. The result never holds NaN.

    Args:
        x: Array of shape (..., H, W), typically (C, H, W) with one channel per date.

    Returns:
        float32 array of the same shape with values in [0, 1].
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"minmax_scale needs an array of shape (..., H, W), got shape {x.shape}")
    finite = np.isfinite(x)
    lo = np.where(finite, x, np.inf).min(axis=(-2, -1), keepdims=True)
    hi = np.where(finite, x, -np.inf).max(axis=(-2, -1), keepdims=True)
    has_data = np.isfinite(lo)  # False for a plane without a single finite pixel
    lo, hi = np.where(has_data, lo, 0.0), np.where(has_data, hi, 0.0)
    span = hi - lo
    usable = np.isfinite(span) & (span > 0)
    span = np.where(usable, span, 1.0)
    scaled = np.where(finite & usable, (np.where(finite, x, 0.0) - lo) / span, 0.0)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


SCALINGS = {"minmax": "minmax-per-chip-channel", "physical": "physical-units"}
"""Scaling name (``fusionkern train --scaling``) -> what a checkpoint records as ``data.scaling``."""

PHYSICAL_UNITS = {"b10": 5.0, "b11": 5.0, "b7": 0.1, "b6": 0.1, "b76": 0.25}
""":func:`physical_scale`: one input unit per band (kelvin for the thermal bands, reflectance, the b7/b6 ratio)."""

PHYSICAL_CENTRES = {"b7": 0.25, "b6": 0.25, "b76": 0.7}
""":func:`physical_scale`: the value mapped to 0 for the reflective bands and the ratio (thermal bands: the
chip's median in each date)."""


def physical_scale(x: np.ndarray, branch: str) -> np.ndarray:
    """One branch of a chip in physical units, brought near the unit range by a fixed map.

    Thermal bands (b10, b11; brightness temperature, K) become kelvin above each (H, W) plane's median over its
    finite pixels, divided by :data:`PHYSICAL_UNITS`; b7, b6 (TOA reflectance) and b76 (their ratio) become
    ``(x - centre) / unit`` (:data:`PHYSICAL_CENTRES`). Non-finite pixels, and planes without any, become 0.

    Args:
        x: Array of shape (..., H, W) of one branch, calibrated (``fusionkern chips`` and the scanner convert DN
            with the MTL unless told ``--no-calibrate``).
        branch: Its name, one of :data:`fusionkern.BRANCHES`.

    Returns:
        float32 array of the same shape.
    """
    if branch not in PHYSICAL_UNITS:
        raise ConfigError(f"no physical scaling for branch {branch!r}; expected one of {', '.join(PHYSICAL_UNITS)}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"physical_scale needs an array of shape (..., H, W), got shape {x.shape}")
    finite = np.isfinite(x)
    if branch in PHYSICAL_CENTRES:
        centre: np.ndarray | float = PHYSICAL_CENTRES[branch]
    else:
        flat = np.where(finite, x, np.nan).reshape(*x.shape[:-2], -1)
        if finite.all():
            median = np.median(flat, axis=-1)
        else:
            median = _nanmedian(flat, finite.reshape(flat.shape).any(axis=-1))
        centre = median[..., None, None]
    out = np.where(finite, (np.where(finite, x, 0.0) - centre) / np.float32(PHYSICAL_UNITS[branch]), 0.0)
    return out.astype(np.float32)


def _nanmedian(flat: np.ndarray, has_data: np.ndarray) -> np.ndarray:
    """Median over the last axis ignoring NaN, 0 where a row has no finite value (without numpy's warning)."""
    out = np.zeros(flat.shape[:-1], dtype=np.float32)
    out[has_data] = np.nanmedian(flat[has_data], axis=-1)
    return out


def scale_chip(x: np.ndarray, branch: str, scaling: str) -> np.ndarray:
    """One branch of a chip, (..., H, W), scaled by ``scaling`` (a key or a value of :data:`SCALINGS`)."""
    name = scaling_name(scaling)
    return minmax_scale(x) if name == "minmax" else physical_scale(x, branch)


def scaling_name(scaling: str | None) -> str:
    """``minmax`` or ``physical`` from a name or a checkpoint's ``data.scaling``; ConfigError otherwise."""
    for name, recorded in SCALINGS.items():
        if scaling in (name, recorded):
            return name
    raise ConfigError(f"unknown scaling {scaling!r}: expected one of {', '.join(SCALINGS)}")


@dataclass(frozen=True)
class AugmentParams:
    """One draw of :class:`SiteAugment`: the chip window's shift, then quarter turns (counter-clockwise) and the
    flips, in that order.

    ``dy`` and ``dx`` move the chip window (rows down, columns right) inside the site's context before it is
    cropped and scaled; :meth:`apply` does not shift (a chip without context has nothing to shift into), the
    dataset crops with :meth:`crop`.
    """

    k: int = 0
    hflip: bool = False
    vflip: bool = False
    dy: int = 0
    dx: int = 0

    def crop(self, image: np.ndarray, size: int) -> np.ndarray:
        """The ``size`` x ``size`` window of (..., H, W) ``image`` centred as a centre crop, then shifted by
        (``dy``, ``dx``) clipped to the context the image has on each side."""
        height, width = image.shape[-2:]
        top, left = (height - size) // 2, (width - size) // 2
        top = int(np.clip(top + self.dy, 0, height - size))
        left = int(np.clip(left + self.dx, 0, width - size))
        return image[..., top : top + size, left : left + size]

    def apply(self, x: ChipT) -> ChipT:
        """Apply this rotation and these flips to the last two axes of ``x`` (a numpy array or a tensor).

        ``hflip`` mirrors left-right (the last axis), ``vflip`` up-down (the second last).
        """
        if isinstance(x, torch.Tensor):
            x = torch.rot90(x, self.k, dims=(-2, -1)) if self.k else x
            x = torch.flip(x, dims=(-1,)) if self.hflip else x
            return torch.flip(x, dims=(-2,)) if self.vflip else x
        x = np.rot90(x, self.k, axes=(-2, -1)) if self.k else x
        x = x[..., ::-1] if self.hflip else x
        x = x[..., ::-1, :] if self.vflip else x
        return np.ascontiguousarray(x)


class SiteAugment:
    """The paper's augmentation: rotation (p 0.9), horizontal flip (p 0.5), vertical flip (p 0.1); and a shift.

    The shift moves the chip window by up to ``max_shift_px`` pixels along each axis (uniform integers), inside the
    context that sites cut with ``fusionkern chips --context-px`` carry, before the chip is cropped and scaled. A
    scan lays chips every half chip whatever lies under them, so a plant sits up to half a stride (about 9 px for a
    35 px chip at the default stride of 17 px) from the nearest chip's centre, and that chip's min-max scaling
    differs from the centred one: training on shifted windows is training on what the scan sees. The default,
    9 px, is that half stride; sites without context are cropped centred (the shift is clipped to the context).

    One draw is applied to every input of a site, so the five branches stay co-registered. Rotations are
    quarter turns, k uniform in {1, 2, 3} (90, 180 or 270 degrees): on a square chip they are lossless, with no
    interpolation of the thermal spot and no empty corners to fill, which an arbitrary angle on a 35 px chip
    would bring. Together with the flips they reach all eight symmetries of the square.

    The generator is this object's own ``numpy.random.Generator``. In the main process it is seeded from
    ``seed``, so a seeded augment gives the same sequence every run. Inside a DataLoader worker it is re-seeded
    on first use from ``seed`` and the worker's torch seed (``get_worker_info().seed``), which differs per worker
    and per epoch and is itself reproducible under ``torch.manual_seed`` or a DataLoader ``generator``.

    Args:
        p_rotate: Probability of a quarter-turn rotation.
        p_hflip: Probability of a left-right flip.
        p_vflip: Probability of an up-down flip.
        seed: Seed of the generator; None draws fresh entropy.
        max_shift_px: Largest shift of the chip window along each axis, in pixels (0: no shift).

    Raises:
        ConfigError: A probability is outside [0, 1], or the shift is negative.
    """

    def __init__(
        self,
        p_rotate: float = 0.9,
        p_hflip: float = 0.5,
        p_vflip: float = 0.1,
        seed: int | None = None,
        max_shift_px: int = 9,
    ):
        for name, p in (("p_rotate", p_rotate), ("p_hflip", p_hflip), ("p_vflip", p_vflip)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"augmentation {name} must be a probability in [0, 1], got {p}")
        if int(max_shift_px) < 0:
            raise ConfigError(f"augmentation max_shift_px must be >= 0, got {max_shift_px}")
        self.p_rotate, self.p_hflip, self.p_vflip = p_rotate, p_hflip, p_vflip
        self.max_shift_px = int(max_shift_px)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._owner: int | None = None  # torch seed of the worker that owns the generator; None = main process

    def __repr__(self) -> str:
        return (
            f"SiteAugment(p_rotate={self.p_rotate}, p_hflip={self.p_hflip}, p_vflip={self.p_vflip}, "
            f"seed={self.seed}, max_shift_px={self.max_shift_px})"
        )

    def sample(self) -> AugmentParams:
        """Draw one rotation, flip and shift; always consumes the same amount of randomness."""
        rng = self._generator()
        u_rotate, u_hflip, u_vflip = rng.random(3)
        k = int(rng.integers(1, 4))
        dy, dx = (int(v) for v in rng.integers(-self.max_shift_px, self.max_shift_px + 1, 2))
        return AugmentParams(
            k=k if u_rotate < self.p_rotate else 0,
            hflip=bool(u_hflip < self.p_hflip),
            vflip=bool(u_vflip < self.p_vflip),
            dy=dy,
            dx=dx,
        )

    def __call__(self, x: ChipT) -> ChipT:
        """Apply one draw to all inputs of a site.

        Args:
            x: Array or tensor of shape (N, C, S, S), N inputs of one site (any leading shape works).

        Returns:
            The transformed inputs, same type and shape.
        """
        if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"SiteAugment needs square chips (..., S, S), got shape {tuple(x.shape)}")
        return self.sample().apply(x)

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        owner = None if info is None else int(info.seed)
        if owner != self._owner:
            entropy = [owner] if self.seed is None else [self.seed, owner]
            self._rng = np.random.default_rng(np.random.SeedSequence(entropy))
            self._owner = owner
        return self._rng
