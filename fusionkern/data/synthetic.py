"""A synthetic labelled dataset in the site layout, with the physics the paper relies on.

Every site is a Landsat-8-like chip at 30 m in three dates: Band 6 and Band 7 TOA reflectance, Band 10 and
Band 11 brightness temperature (kelvin) and the Band 7 / Band 6 ratio, written as georeferenced GeoTIFFs in the
UTM zone of the site.

- **Landcover**: smooth random fields (Gaussian-filtered noise over a few octaves, built with an FFT) of
  vegetation cover and soil moisture. Vegetation greens up from winter to summer, which lowers b7 more than b6;
  dry bare soil is bright in both and warm; brightness temperature follows latitude and season (cold January,
  milder April), is cooler over vegetation and wet soil, and is smoothed by the 100 m thermal footprint.
- **Cement**: the same background plus the two signatures of section II-A: a kiln heat spot of a few pixels,
  +5..15 K in b10 (slightly less in b11), sustained in all three dates; and a halo of dry, dusty altered soil a
  few hundred metres across that raises b7 more than b6, hence b7 / b6.
- **Confusers** in some landcover chips: a warm spot in one date only (a fire, a sunlit roof), a bright dry field
  or quarry without heat, a town with a broad heat island, and rarely a small industrial site with a steady
  weak hot spot; some cement plants run cool. The task is thus learnable but not trivial.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fusionkern import BRANCHES, CLASSES
from fusionkern.data.layouts import SITES_CSV, Site
from fusionkern.errors import ConfigError, InputError, MissingDependencyError
from fusionkern.landsat import band_ratio

PIXEL_M = 30.0
"""Ground sample distance of the synthetic chips, metres (Landsat-8 bands 6 and 7; 10 and 11 resampled)."""

THERMAL_PSF_PX = 1.4
"""Standard deviation (px at 30 m) of the blur that mimics the 100 m thermal footprint resampled to 30 m."""

LANDCOVER_OFFSET_M = 3500.0
"""Distance from a plant at which landcover chips are placed, as the authors took them about 3.5 km around."""

_OCTAVES_PX = (1.0, 2.5, 6.0, 14.0)
_OCTAVE_WEIGHTS = (0.25, 0.5, 0.8, 1.0)


@dataclass(frozen=True)
class _Scene:
    """Raw rasters of one site, each (dates, H, W): reflectance b6, b7 and brightness temperature b10, b11."""

    b10: np.ndarray
    b11: np.ndarray
    b7: np.ndarray
    b6: np.ndarray


def make_synthetic_sites(
    root: str | Path,
    n_cement: int = 60,
    n_landcover: int = 120,
    chip_px: int = 35,
    seed: int = 0,
    dates: Sequence[str] = ("2018-01", "2017-01", "2017-04"),
    write_b76: bool = True,
    context_px: int = 0,
    landcover: str = "mixed",
) -> list[Site]:
    """Write a synthetic dataset in the site layout and return its sites.

    Args:
        root: Folder to write (created; must not already hold cement/ or landcover/ sites).
        n_cement: Number of cement sites.
        n_landcover: Number of landcover sites.
        chip_px: Side of every chip in pixels (35 px is about 1 km).
        seed: Seed of the whole dataset; site ``i`` of a class depends only on this seed and ``i``.
        dates: Three dates ``YYYY-MM`` in band order; their months set the season of each band.
        write_b76: Also write ``b76.tif``; when False, readers derive it from b7 and b6.
        context_px: Pixels of context around every chip (as ``fusionkern chips --context-px``), at most half
            the chip: the files hold ``chip_px + 2 * context_px`` pixels a side.
        landcover: ``mixed`` (default): landcover with the look-alikes a region holds, each drawn by chance
            (one-date heat, dry fields, towns, now and then other heavy industry); ``industry``: every landcover
            site is a works of other heavy industry (a power, steel or lime works), as cut from a register of known
            works to teach a model what separates them from cement.

    Returns:
        The sites, cement first, each sorted by name, with longitude and latitude.

    Raises:
        ConfigError: A count, the chip size or a date is invalid.
        InputError: ``root`` already holds a dataset.
        MissingDependencyError: rasterio is not installed.
    """
    months = _check_args(n_cement, n_landcover, chip_px, dates)
    if landcover not in ("mixed", "industry"):
        raise ConfigError(f"landcover must be 'mixed' or 'industry', got {landcover!r}")
    industry = landcover == "industry"
    if not 0 <= context_px <= chip_px // 2:
        raise ConfigError(f"context_px must be within 0..{chip_px // 2} for {chip_px} px chips, got {context_px}")
    root = Path(root)
    _check_empty(root)
    seeds = np.random.SeedSequence(seed).spawn(3)
    plants = _plant_locations(np.random.default_rng(seeds[0]), n_cement)
    landcover = _landcover_locations(np.random.default_rng(seeds[1]), plants, n_landcover)
    site_rngs = [np.random.default_rng(s) for s in seeds[2].spawn(n_cement + n_landcover)]
    sites = []
    for label, locations in enumerate((plants, landcover)):
        for i, (lon, lat) in enumerate(locations):
            rng = site_rngs[i if label == 0 else n_cement + i]
            scene = _make_scene(rng, chip_px, months, lat, cement=label == 0, context_px=context_px,
                                industry=industry)  # fmt: skip
            name = f"{CLASSES[label]}_{i:04d}"
            paths = _write_site(root / CLASSES[label] / name, scene, lon, lat, dates, write_b76)
            sites.append(Site(name, label, paths, float(lon), float(lat)))
    _write_sites_csv(root / SITES_CSV, sites)
    return sites


def _check_args(n_cement: int, n_landcover: int, chip_px: int, dates: Sequence[str]) -> list[int]:
    if n_cement < 1 or n_landcover < 1:
        raise ConfigError(f"need at least one site per class, got n_cement={n_cement}, n_landcover={n_landcover}")
    if chip_px < 8:
        raise ConfigError(f"chip_px must be at least 8 pixels, got {chip_px}")
    if len(dates) != 3:
        raise ConfigError(f"need exactly three dates (one per channel), got {len(dates)}: {', '.join(dates)}")
    return [_month(d) for d in dates]


def _month(date: str) -> int:
    """Month of a ``YYYY-MM`` (or ``YYYY-MM-DD``) date."""
    parts = str(date).split("-")
    if len(parts) >= 2 and parts[1].isdigit() and 1 <= int(parts[1]) <= 12:
        return int(parts[1])
    raise ConfigError(f"date {date!r} is not of the form YYYY-MM")


def _check_empty(root: Path) -> None:
    for cls in CLASSES:
        folder = root / cls
        if folder.is_dir() and any(folder.iterdir()):
            raise InputError(f"{folder} already holds sites; write the synthetic dataset to an empty folder")


def _plant_locations(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 2) lon, lat of plants spread over eastern China, where most integrated plants are."""
    return np.column_stack([rng.uniform(103.0, 122.0, n), rng.uniform(22.0, 41.0, n)])


def _landcover_locations(rng: np.random.Generator, plants: np.ndarray, n: int) -> np.ndarray:
    """(n, 2) lon, lat of landcover chips, each about 3.5 km from a random plant in a random direction."""
    lon, lat = plants[rng.integers(0, len(plants), n)].T
    bearing = rng.uniform(0.0, 2.0 * np.pi, n)
    dist = LANDCOVER_OFFSET_M * rng.uniform(0.9, 1.1, n)
    dlat = dist * np.cos(bearing) / 111_320.0
    dlon = dist * np.sin(bearing) / (111_320.0 * np.cos(np.radians(lat)))
    return np.column_stack([lon + dlon, lat + dlat])


# ----------------------------------------------------------------------------------------------------------------
# Scene content. Everything is drawn on a grid twice the chip size and cropped at the end, so that the FFT's
# periodic boundary stays far from the chip.


def _spectral_filter(size: int, sigmas: Sequence[float], weights: Sequence[float]) -> np.ndarray:
    """rfft2 transfer function: a weighted sum of Gaussians, each scaled to give its octave unit variance."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f2 = fx**2 + fy**2
    return sum(w * s * np.exp(-2.0 * np.pi**2 * s**2 * f2) for s, w in zip(sigmas, weights))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], size: int) -> np.ndarray:
    """Zero-mean, unit-variance smooth random fields of shape (*shape, size, size)."""
    noise = rng.standard_normal((*shape, size, size))
    field = np.fft.irfft2(np.fft.rfft2(noise) * _spectral_filter(size, _OCTAVES_PX, _OCTAVE_WEIGHTS), s=(size, size))
    field -= field.mean(axis=(-2, -1), keepdims=True)
    return field / field.std(axis=(-2, -1), keepdims=True)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the last two axes (periodic), standing in for the thermal sensor footprint."""
    size = x.shape[-1]
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    transfer = np.exp(-2.0 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(x) * transfer, s=(size, size))


def _blob(size: int, centre: np.ndarray, sigma: float, elongation: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """A Gaussian bump of peak 1 on a (size, size) grid, optionally elongated along ``angle``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    return np.exp(-((along / elongation) ** 2 + (across * elongation) ** 2) / (2.0 * sigma**2))


def _season(months: Sequence[int]) -> np.ndarray:
    """Per date, 1 at the height of summer (July) and -1 in mid-winter (January)."""
    return np.cos(2.0 * np.pi * (np.asarray(months, dtype=np.float64) - 7.0) / 12.0)[:, None, None]


@dataclass
class _Surface:
    """What a site is made of, each (dates, size, size): the state the spectral models turn into bands.

    Attributes:
        veg: Vegetation cover, 0..1.
        moist: Soil moisture, 0..1.
        heat: Kelvin added to b10 by heat sources, as the thermal band sees them.
        add_b6: Band 6 reflectance added by surface materials (concrete, dust).
        add_b7: Band 7 reflectance added by surface materials.
        works: Where given, every hot works drawn on the surface appends ``(kiln_k, dust)`` to it (a record of
            what was drawn; it takes nothing from the random generator).
    """

    veg: np.ndarray
    moist: np.ndarray
    heat: np.ndarray
    add_b6: np.ndarray
    add_b7: np.ndarray
    works: list | None = None

    def alter_soil(self, weight: np.ndarray) -> None:
        """Strip vegetation and moisture where ``weight`` (0..1) is high and add dry mineral dust (b7 up, b6 less)."""
        self.veg *= 1.0 - 0.9 * weight
        self.moist *= 1.0 - 0.8 * weight
        self.add_b7 += 0.05 * weight
        self.add_b6 += 0.015 * weight

    def build(self, weight: np.ndarray, b6: float, b7: float) -> None:
        """Cover the ground with a built material of the given reflectances where ``weight`` is high."""
        self.add_b6 += b6 * weight
        self.add_b7 += b7 * weight


def _make_scene(
    rng: np.random.Generator, chip_px: int, months: Sequence[int], lat: float, cement: bool, context_px: int = 0,
    industry: bool = False,
) -> _Scene:
    """Draw one site: the landcover background, then a plant, (sometimes) a confuser, or with ``industry`` a works
    of other heavy industry on top; the chip and ``context_px`` pixels around it are kept."""
    size = 2 * chip_px
    centre = np.array([size / 2.0 - 0.5, size / 2.0 - 0.5])
    veg, moist = _land_surface(rng, size, months)
    zeros = np.zeros_like(veg)
    surface = _Surface(veg, moist, zeros.copy(), zeros.copy(), zeros.copy())
    if cement:
        _add_plant(rng, size, centre, surface)
    elif industry:
        _add_other_industry(rng, size, centre, surface)
    else:
        _add_confusers(rng, size, centre, surface)
    b6, b7 = _reflectance(rng, surface)
    b10, b11 = _brightness_temperature(rng, surface, months, lat)
    crop = slice(chip_px // 2 - context_px, chip_px // 2 + chip_px + context_px)
    return _Scene(*(a[:, crop, crop].astype(np.float32) for a in (b10, b11, b7, b6)))


def _land_surface(rng: np.random.Generator, size: int, months: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Vegetation cover and soil moisture in [0, 1], each (dates, size, size), following the season."""
    n_dates = len(months)
    pattern = _smooth_field(rng, (), size)  # field layout is the same on every date
    cover = 1.0 / (1.0 + np.exp(-(1.6 * pattern + rng.normal(0.0, 1.0))))
    green_up = 0.65 + 0.35 * _season(months)  # 0.3 in January, 0.65 in April, 1 in July
    veg = np.clip(cover * green_up + 0.05 * _smooth_field(rng, (n_dates,), size), 0.0, 1.0)
    wetness = rng.uniform(0.25, 0.75) + rng.normal(0.0, 0.12, (n_dates, 1, 1)) + 0.08 * _season(months)
    moist = np.clip(wetness + 0.15 * _smooth_field(rng, (), size) + 0.05 * _smooth_field(rng, (n_dates,), size), 0, 1)
    return veg, moist


def _add_plant(rng: np.random.Generator, size: int, centre: np.ndarray, surface: _Surface) -> None:
    """A cement plant near the chip centre; about one in five runs cool, with little dust (the hard cases)."""
    site = centre + rng.uniform(-3.0, 3.0, 2)
    if rng.random() < 0.2:
        _add_works(rng, size, site, surface, kiln_k=rng.uniform(2.5, 5.0), dust=rng.uniform(0.2, 0.45))
    else:
        _add_works(rng, size, site, surface, kiln_k=rng.uniform(5.0, 15.0), dust=rng.uniform(0.5, 1.0))


def _add_works(
    rng: np.random.Generator, size: int, site: np.ndarray, surface: _Surface, kiln_k: float, dust: float
) -> None:
    """A hot industrial works at ``site``: dry dusty halo, bright concrete core and a sustained hot spot.

    Args:
        rng: The site's generator.
        size: Side of the drawing grid.
        site: (row, col) of the works on the grid.
        surface: The surface to alter in place.
        kiln_k: Peak excess brightness temperature of the hot spot in b10, kelvin, before a per-date variation.
        dust: Strength (0..1) of the altered-soil halo.
    """
    if surface.works is not None:
        surface.works.append((float(kiln_k), float(dust)))
    halo = _blob(size, site, rng.uniform(4.0, 8.0), rng.uniform(1.0, 1.6), rng.uniform(0, np.pi))
    surface.alter_soil(dust * halo)
    surface.build(_blob(size, site, rng.uniform(1.2, 2.2), rng.uniform(1.0, 2.0), rng.uniform(0, np.pi)), 0.05, 0.045)
    kiln = site + rng.uniform(-1.5, 1.5, 2)
    per_date = kiln_k * rng.uniform(0.8, 1.15, (surface.heat.shape[0], 1, 1))
    surface.heat += per_date * _hot_spot(size, kiln, rng.uniform(0.7, 1.4))


def _add_confusers(rng: np.random.Generator, size: int, centre: np.ndarray, surface: _Surface) -> None:
    """Landcover look-alikes, each drawn independently: transient heat, dry fields, towns, other industry."""
    n_dates = surface.heat.shape[0]
    if rng.random() < 0.3:  # a fire or sunlit roof: hot in one date only
        spot = _hot_spot(size, centre + rng.uniform(-6.0, 6.0, 2), rng.uniform(0.7, 1.5))
        surface.heat[rng.integers(0, n_dates)] += rng.uniform(5.0, 14.0) * spot
    if rng.random() < 0.3:  # a bare dry field or quarry: altered soil, no heat
        shape = (rng.uniform(3.0, 8.0), rng.uniform(1.0, 2.5), rng.uniform(0, np.pi))
        surface.alter_soil(rng.uniform(0.4, 1.0) * _blob(size, centre + rng.uniform(-6.0, 6.0, 2), *shape))
    if rng.random() < 0.15:  # a town: broad urban heat island, bright built surfaces
        town = _blob(size, centre + rng.uniform(-8.0, 8.0, 2), rng.uniform(3.0, 5.0))
        surface.heat += rng.uniform(1.5, 4.0) * town
        surface.build(town, 0.04, 0.03)
    if rng.random() < 0.08:  # other heavy industry (a power plant, a steel or lime works): looks like a plant
        _add_other_industry(rng, size, centre, surface)


def _add_other_industry(rng: np.random.Generator, size: int, centre: np.ndarray, surface: _Surface) -> None:
    """A works of other heavy industry near ``centre``: drawn as a cement works is, with its own kiln heat and
    dust, which overlap cement's (3-9 K against 5-15 K, hard plants 2.5-5 K; dust 0.2-0.7 against 0.5-1.0)."""
    site = centre + rng.uniform(-6.0, 6.0, 2)
    _add_works(rng, size, site, surface, kiln_k=rng.uniform(3.0, 9.0), dust=rng.uniform(0.2, 0.7))


def _hot_spot(size: int, centre: np.ndarray, sigma: float) -> np.ndarray:
    """A compact heat source as the thermal band sees it: peak 1 after the sensor footprint widens it."""
    return _blob(size, centre, float(np.hypot(sigma, THERMAL_PSF_PX)))


def _reflectance(rng: np.random.Generator, surface: _Surface) -> tuple[np.ndarray, np.ndarray]:
    """TOA reflectance of bands 6 and 7 from vegetation cover, moisture and added surface materials."""
    veg, moist = surface.veg, surface.moist
    brightness = rng.uniform(0.85, 1.15)
    soil_b6 = 0.33 - 0.12 * moist  # dry soil ~0.33, wet ~0.21
    soil_b7 = 0.28 - 0.14 * moist  # water absorbs more at 2.2 um than at 1.6 um
    b6 = brightness * (veg * 0.21 + (1.0 - veg) * soil_b6) + surface.add_b6
    b7 = brightness * (veg * 0.10 + (1.0 - veg) * soil_b7) + surface.add_b7
    noise = rng.normal(0.0, 0.004, (2, *b6.shape))
    return np.clip(b6 + noise[0], 0.02, 0.6), np.clip(b7 + noise[1], 0.01, 0.6)


def _brightness_temperature(
    rng: np.random.Generator, surface: _Surface, months: Sequence[int], lat: float
) -> tuple[np.ndarray, np.ndarray]:
    """Band 10 and 11 brightness temperature (K): climate by latitude and season, surface cooling, heat sources."""
    veg, moist, heat = surface.veg, surface.moist, surface.heat
    n_dates, size = veg.shape[0], veg.shape[-1]
    annual_mean = 297.0 - 0.55 * (lat - 20.0)
    seasonal_swing = 7.0 + 0.45 * (lat - 20.0)  # continental north: colder winters
    climate = annual_mean + seasonal_swing * _season(months) + rng.normal(0.0, 2.0, (n_dates, 1, 1))
    # dry bare ground heats up, vegetation and wet soil stay cool (evaporation); relief adds smooth variation
    land = 5.0 * (1.0 - veg) * (1.0 - moist) - 2.0 * veg - 1.5 + 1.5 * _smooth_field(rng, (n_dates,), size)
    b10 = _blur(climate + land, THERMAL_PSF_PX) + heat
    vapour = rng.uniform(0.0, 1.0, (n_dates, 1, 1))  # split window: b11 reads colder in humid air
    b11 = b10 - (0.6 + 1.4 * vapour) - 0.15 * heat + 0.1 * _smooth_field(rng, (n_dates,), size)
    noise = rng.normal(0.0, 0.15, (2, n_dates, size, size))
    return b10 + noise[0], b11 + noise[1]


# ----------------------------------------------------------------------------------------------------------------
# Writing.


def _utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS 84 / UTM zone holding a point."""
    zone = int((lon + 180.0) // 6.0) + 1
    return (32600 if lat >= 0 else 32700) + zone


def _write_site(folder: Path, scene: _Scene, lon: float, lat: float, dates: Sequence[str], write_b76: bool):
    """Write one site's GeoTIFFs, georeferenced on the 30 m UTM grid around (lon, lat); returns its paths."""
    try:
        import rasterio
        from rasterio.transform import from_origin
        from rasterio.warp import transform as warp_points
    except ImportError as exc:
        raise MissingDependencyError("rasterio", "geo", "Writing synthetic GeoTIFFs") from exc
    epsg = _utm_epsg(lon, lat)
    (easting,), (northing,) = warp_points("EPSG:4326", f"EPSG:{epsg}", [lon], [lat])
    height, width = scene.b10.shape[-2:]
    west = np.floor(easting / PIXEL_M) * PIXEL_M - (width // 2) * PIXEL_M
    north = np.floor(northing / PIXEL_M) * PIXEL_M + (height // 2 + 1) * PIXEL_M
    profile = {
        "driver": "GTiff", "dtype": "float32", "count": 3, "height": height, "width": width,
        "crs": f"EPSG:{epsg}", "transform": from_origin(west, north, PIXEL_M, PIXEL_M), "nodata": float("nan"),
    }  # fmt: skip
    rasters = {"b10": scene.b10, "b11": scene.b11, "b7": scene.b7, "b6": scene.b6}
    if write_b76:
        rasters["b76"] = band_ratio(scene.b7, scene.b6)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for branch in (b for b in BRANCHES if b in rasters):
        paths[branch] = folder / f"{branch}.tif"
        with rasterio.open(paths[branch], "w", **profile) as dst:
            dst.write(rasters[branch])
            dst.descriptions = tuple(dates)
            if branch in ("b10", "b11"):
                dst.units = ("K",) * len(dates)
    return paths


def _write_sites_csv(path: Path, sites: Sequence[Site]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["site", "label", "lon", "lat"])
        for site in sites:
            writer.writerow([site.name, site.class_name, f"{site.lon:.6f}", f"{site.lat:.6f}"])
