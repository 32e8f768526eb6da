"""From chip probabilities to decisions: the deployment prior, the threshold and the verifier.

A region holds about a thousand landcover chips per plant chip, while training sets hold a few. Three things make
a scan's detections mean what they say at that base rate:

* **Prior shift.** A checkpoint records the class prior its training implied (the cement share of its training
  sites, weighted by the loss's class weights: ``data.prior``). The scan moves every chip's log-odds from that
  prior to the deployment prior (``--prior``; by default the one ``fusionkern calibrate`` stored, else none):
  ``logit(p') = logit(p) + logit(prior) - logit(train_prior)``. Ranking is unchanged; probabilities then read
  as probabilities at the deployment base rate.
* **A calibrated threshold.** ``fusionkern calibrate`` scans plant-free background and stores the threshold that
  meets a budget of false detections per 1000 km² (``metadata.calibration``); the scan uses it by default.
* **A verifier.** Sites above a low candidate threshold are scored again on chips re-centred on their peak, by an
  ensemble of checkpoints (by default the split checkpoints that ``fusionkern train`` wrote beside the one
  scanning) under the four quarter turns of the chip; their log-odds are averaged. Only the few candidates are
  verified, so it costs little next to the scan. Each member scales the chips as it was trained: a checkpoint
  trained on physical units (``fusionkern train --scaling physical``) sees the kiln's heat in kelvin and the dust's
  reflectance, which the scan's min-max scaled chips do not keep.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fusionkern.data.transforms import scaling_name
from fusionkern.errors import CheckpointError, ConfigError, InputError

DEFAULT_THRESHOLD = 0.5
"""Detection threshold of a checkpoint that was never calibrated."""

CANDIDATE_FACTOR = 0.25
"""Without a calibrated candidate threshold, candidates for the verifier are chips at this fraction of the
detection threshold's odds (about 1.4 in log-odds below it)."""

MAX_CANDIDATES_PER_1000KM2 = 20.0
"""Most candidate sites the verifier scores per 1000 km² scanned (the best first): it bounds the verifier's cost
near a tenth of the scan's on any region, however many look-alikes it holds."""

MIN_CANDIDATES = 10
"""Candidate sites the verifier may always score, however small the region."""

_EPS = 2.0**-25  # keeps float32 probabilities of exactly 0 or 1 at finite log-odds


# --------------------------------------------------------------------------------------------------------------
# Priors
# --------------------------------------------------------------------------------------------------------------


def logit(p: float | np.ndarray) -> Any:
    """Log-odds of probabilities, clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: float | np.ndarray) -> Any:
    """The inverse of :func:`logit`."""
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def effective_prior(n_cement: int, n_landcover: int, class_weights: Sequence[float]) -> float:
    """The cement prior a model trained with weighted cross-entropy estimates probabilities for.

    The weighted loss is minimised by ``p(cement | x)`` of a population where cement counts ``w_c`` times, so the
    model's probabilities are those of a prior ``w_c n_c / (w_c n_c + w_l n_l)``.

    Args:
        n_cement: Cement training sites.
        n_landcover: Landcover training sites.
        class_weights: The loss's (cement, landcover) weights.
    """
    w_c, w_l = (float(w) for w in class_weights)
    return w_c * n_cement / (w_c * n_cement + w_l * n_landcover)


def check_prior(value: float, what: str = "--prior") -> float:
    """A prior in (0, 1), or ConfigError."""
    if not (isinstance(value, (int, float)) and 0.0 < float(value) < 1.0):
        raise ConfigError(f"{what} must be a probability strictly between 0 and 1, got {value}")
    return float(value)


def training_prior(model: Any) -> float | None:
    """The training prior a checkpoint records (``data.prior.cement``), or None for older checkpoints."""
    prior = (model.checkpoint.get("data") or {}).get("prior") or {}
    value = prior.get("cement") if isinstance(prior, dict) else None
    return float(value) if value is not None else None


def shift_scores(scores: np.ndarray, shift: float) -> np.ndarray:
    """Probabilities with ``shift`` added to their log-odds, float32; NaN stays NaN. A zero shift is a copy."""
    if shift == 0.0:
        return np.array(scores, dtype=np.float32, copy=True)
    with np.errstate(invalid="ignore"):
        out = sigmoid(logit(scores) + shift)
    out[~np.isfinite(scores)] = np.nan
    return out.astype(np.float32)


def shift_threshold(threshold: float, shift: float) -> float:
    """A threshold moved by ``shift`` in log-odds (the same decisions under another prior)."""
    if shift == 0.0 or threshold <= 0.0 or threshold >= 1.0:
        return float(threshold)
    return float(sigmoid(logit(threshold) + shift))


# --------------------------------------------------------------------------------------------------------------
# What a scan decides with
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Decision:
    """How a scan turns chip probabilities into detections.

    Attributes:
        train_prior: The checkpoint's training prior (None: not recorded).
        prior: The deployment prior the scores are moved to (None: no shift).
        shift: Log-odds added to every chip (``logit(prior) - logit(train_prior)``, or 0).
        threshold: Detection threshold on the (shifted) scores, or on the verifier's where it runs.
        threshold_source: ``option``, ``calibration`` or ``default``.
        verify: Checkpoints of the verifier ensemble (empty: no verification).
        candidate_threshold: Chip probability from which sites are verified (with ``verify``).
        calibration: What the checkpoint's calibration recorded (None: not calibrated).
        notes: Anything the user should know about how the values were chosen.
    """

    train_prior: float | None
    prior: float | None
    shift: float
    threshold: float
    threshold_source: str
    verify: list[Path] = field(default_factory=list)
    candidate_threshold: float | None = None
    calibration: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """The decision as JSON values (for ``scan.json``)."""
        calibration = self.calibration or {}
        return {
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "prior": self.prior,
            "train_prior": self.train_prior,
            "logit_shift": self.shift,
            "fp_budget_per_1000km2": calibration.get("fp_per_1000km2"),
            "verify": [str(p) for p in self.verify],
            "candidate_threshold": self.candidate_threshold,
            "notes": list(self.notes),
        }


def resolve_decision(
    model: Any,
    checkpoint: str | os.PathLike,
    threshold: float | None = None,
    prior: float | None = None,
    verify: str | None = None,
    candidate_threshold: float | None = None,
) -> Decision:
    """The prior, threshold and verifier a scan uses: the options given, else the checkpoint's calibration.

    Args:
        model: The loaded scan model (its ``checkpoint`` data and metadata).
        checkpoint: Its path (``verify="auto"`` looks beside it).
        threshold: ``--threshold``, or None.
        prior: ``--prior``, or None.
        verify: ``--verify``: ``auto``, a checkpoint, a training folder, a list file, ``none``; None: as the
            checkpoint's calibration did (``auto`` where it calibrated a verified threshold), else none.
        candidate_threshold: ``--candidate-threshold``, or None.

    Raises:
        CheckpointError: ``--prior`` with a checkpoint that records no training prior.
        ConfigError: A value out of range.
        InputError: Verifier checkpoints that cannot be found.
    """
    train_prior = training_prior(model)
    calibration = (model.checkpoint.get("metadata") or {}).get("calibration")
    notes: list[str] = []
    if prior is not None:
        prior = check_prior(prior)
        if train_prior is None:
            raise CheckpointError(
                f"{checkpoint} records no training prior (data.prior), so --prior cannot be applied; "
                "retrain it with this version of fusionkern train, or scan without --prior"
            )
    elif calibration and calibration.get("prior") is not None:
        prior = float(calibration["prior"])
    elif train_prior is not None:
        prior = train_prior
    shift = float(logit(prior) - logit(train_prior)) if prior is not None and train_prior is not None else 0.0
    paths: list[Path] = []
    if verify is None and (calibration or {}).get("verified"):
        # calibrated with a verifier: scan with the same one unless told --verify none
        paths = calibrated_verifier(calibration["verified"], checkpoint)
        notes.append("verifying with the checkpoints the calibration verified with (--verify none turns it off)")
    elif verify not in (None, "none"):
        paths = resolve_verifier(verify, checkpoint)
    mode = "verified" if paths else "plain"
    source = "option"
    if threshold is None:
        calibrated = (calibration or {}).get(mode)
        if calibrated:
            # the calibration's threshold applies to scores at its own prior: move it with the prior
            moved = float(logit(prior) - logit(calibration["prior"])) if prior is not None else 0.0
            threshold, source = shift_threshold(calibrated["threshold"], moved), "calibration"
            if paths and candidate_threshold is None and calibrated.get("candidate_threshold") is not None:
                candidate_threshold = shift_threshold(calibrated["candidate_threshold"], moved)
        else:
            threshold, source = DEFAULT_THRESHOLD, "default"
            if calibration:
                notes.append(f"the checkpoint's calibration has no {mode} threshold; using {DEFAULT_THRESHOLD}")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be a probability in [0, 1], got {threshold}")
    if paths and candidate_threshold is None:
        candidate_threshold = shift_threshold(threshold, math.log(CANDIDATE_FACTOR))
    if candidate_threshold is not None and not 0.0 <= candidate_threshold <= 1.0:
        raise ConfigError(f"--candidate-threshold must be a probability in [0, 1], got {candidate_threshold}")
    return Decision(train_prior, prior, shift, float(threshold), source, paths,
                    candidate_threshold if paths else None, calibration, notes)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------------------------------


def resolve_verifier(spec: str, checkpoint: str | os.PathLike) -> list[Path]:
    """The verifier's checkpoints.

    Args:
        spec: ``auto`` (the ``split_*/best.pt`` beside the scan's checkpoint when it lies in a ``split_<k>``
            folder of a training run, else the checkpoint itself), a checkpoint file, a training output folder
            (its ``split_*/best.pt``), or a text file listing checkpoints one per line.
        checkpoint: The scan's checkpoint.

    Raises:
        InputError: Nothing found, or a listed checkpoint that does not exist.
    """
    if spec == "auto":
        here = Path(checkpoint).resolve()
        if here.parent.name.startswith("split_"):
            found = sorted(here.parent.parent.glob("split_*/best.pt"))
            if found:
                return found
        return [here]
    path = Path(spec)
    if path.is_dir():
        found = sorted(path.glob("split_*/best.pt")) or sorted(path.glob("*.pt"))
        if not found:
            raise InputError(f"--verify {spec}: the folder holds no split_*/best.pt or *.pt checkpoint")
        return found
    if not path.is_file():
        raise InputError(f"--verify {spec}: no such checkpoint, training folder or list file")
    if path.suffix == ".pt":
        return [path]
    from fusionkern.scan.backends import EXPORTED_SUFFIXES

    if path.suffix.lower() in EXPORTED_SUFFIXES:
        raise InputError(f"--verify {spec}: an exported model; the verifier runs checkpoints (.pt) in torch, give "
                         "the checkpoint it was exported from")  # fmt: skip
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--verify {spec}: neither a checkpoint (.pt) nor a text file listing checkpoints") from None
    listed = [Path(line.strip()) for line in text.splitlines() if line.strip()]
    listed = [p if p.is_absolute() else path.parent / p for p in listed]
    missing = [str(p) for p in listed if not p.is_file()]
    if not listed or missing:
        raise InputError(f"--verify {spec}: " + (f"listed checkpoint(s) not found: {', '.join(missing[:3])}"
                                                  if missing else "the list names no checkpoint"))  # fmt: skip
    return listed


def calibrated_verifier(verified: dict[str, Any], checkpoint: str | os.PathLike) -> list[Path]:
    """The verifier a calibration was made with: the checkpoints it recorded where they all still exist, else the
    split checkpoints beside ``checkpoint`` if that is what it recorded (a training folder moved as a whole).

    Raises:
        InputError: The recorded verifier is gone and was not the split checkpoints: its threshold would not
            apply to another one.
    """
    recorded = [Path(p) for p in verified.get("checkpoints") or []]
    if recorded and all(p.is_file() for p in recorded):
        return recorded
    if all(p.name == "best.pt" and p.parent.name.startswith("split_") for p in recorded):
        return resolve_verifier("auto", checkpoint)
    missing = ", ".join(str(p) for p in recorded if not p.is_file())
    raise InputError(f"{checkpoint} was calibrated with verifier checkpoints that are gone ({missing}); pass "
                     "--verify PATH with them, --verify none, or calibrate again")  # fmt: skip


DIHEDRAL = tuple((k, flip) for k in range(4) for flip in (False, True))
"""The eight symmetries of the square: quarter turns, each with and without a left-right flip."""

ROTATIONS = tuple((k, False) for k in range(4))
"""The four quarter turns: the verifier's default views, half the cost of all eight symmetries for about the same
averaging (the training augmentation draws rotations and flips alike, so either subgroup spans its variations)."""


class Verifier:
    """An ensemble of checkpoints scoring re-centred chips under symmetries of the square.

    Args:
        paths: The checkpoints (FusionNet, the scan model's chip size).
        reference: The scan's model: every member's log-odds are moved to its training prior.
        device: Torch device.
        batch_size: Chips per forward pass.
        views: The symmetries each chip is scored under, ``(quarter turns, flip)`` pairs: :data:`ROTATIONS`
            (default) or :data:`DIHEDRAL`.

    Raises:
        CheckpointError: A member that is not a FusionNet of the scan model's chip size, or scaled otherwise than
            min-max per chip or in physical units.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        reference: Any,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
        views: Sequence[tuple[int, bool]] = ROTATIONS,
    ):
        from fusionkern.scan.backends import load_scan_model

        self.views = tuple(views)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.paths = [Path(p) for p in paths]
        self.models = []
        self.scalings = []  # each member's chip scaling (minmax or physical)
        self.offsets = []  # log-odds moving each member to the reference's training prior
        base = training_prior(reference)
        for path in self.paths:
            member = load_scan_model(path, verifier=True)
            if not isinstance(member, torch.nn.Module):
                raise CheckpointError(f"verifier {path} is an exported model; the verifier runs checkpoints (.pt)")
            self.scalings.append(scaling_name(member.checkpoint["data"].get("scaling")))
            if int(member.checkpoint["data"]["chip_px"]) != int(reference.checkpoint["data"]["chip_px"]):
                raise CheckpointError(f"verifier {path} takes {member.checkpoint['data']['chip_px']} px chips, "
                                      f"the scan model {reference.checkpoint['data']['chip_px']} px")  # fmt: skip
            own = training_prior(member)
            self.offsets.append(float(logit(base) - logit(own)) if base is not None and own is not None else 0.0)
            self.models.append(member.to(self.device).eval())

    @torch.inference_mode()
    def log_odds(self, chips: np.ndarray) -> np.ndarray:
        """Mean cement log-odds (at the reference's training prior) of raw chips (N, 5, 3, S, S): calibrated
        bands in ``BRANCHES`` order, as :func:`recentred_chips` reads them with ``scale=False``.

        Each member scores the chips scaled as it was trained, under every view; the N means come back as float64.
        """
        if not len(chips):
            return np.zeros(0, dtype=np.float64)
        stacks = {name: self._views(scale_verifier_chips(chips, name)) for name in sorted(set(self.scalings))}
        total = torch.zeros(len(chips), dtype=torch.float64)
        for model, offset, scaling in zip(self.models, self.offsets, self.scalings):
            stack, margins = stacks[scaling], []
            for start in range(0, len(stack), self.batch_size):
                batch = stack[start : start + self.batch_size].to(self.device)
                logits = model(model.prepare(batch)).double().cpu()
                margins.append(logits[:, 0] - logits[:, 1])  # cement minus landcover: the log-odds
            total += torch.cat(margins).reshape(len(chips), len(self.views)).mean(dim=1) + offset
        return (total / len(self.models)).numpy()

    def _views(self, chips: np.ndarray) -> torch.Tensor:
        """(N, 5, 3, S, S) scaled chips -> (N * views, 5, 3, S, S), each chip's views together."""
        x = torch.from_numpy(np.ascontiguousarray(chips, dtype=np.float32))
        views = []
        for k, flip in self.views:
            view = torch.rot90(x, k, dims=(-2, -1)) if k else x
            views.append(torch.flip(view, dims=(-1,)) if flip else view)
        return torch.stack(views, dim=1).reshape(-1, *x.shape[1:])

    def score(
        self, inputs: Any, grid: Any, layout: Any, points: Sequence[tuple[float, float]], shift: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ensemble's cement probability of the chips re-centred on grid-CRS points (:func:`read_recentred`).

        Args:
            inputs: The scan's rasters.
            grid: The scan grid.
            layout: The chips (their size).
            points: Grid-CRS (x, y) centres.
            shift: Log-odds added before the probability (the scan's prior shift).

        Returns:
            (N,) float64 probabilities, NaN where no whole chip could be read, and the bool mask of those read.
        """
        chips, valid = read_recentred(inputs, grid, layout, points, scale=False)
        probabilities = np.full(len(points), np.nan)
        probabilities[valid] = sigmoid(self.log_odds(chips[valid]) + shift)
        return probabilities, valid

    def describe(self) -> dict[str, Any]:
        """The ensemble, for ``scan.json``."""
        from fusionkern.files import sha256_file

        return {"checkpoints": [{"path": str(p), "sha256": sha256_file(p), "scaling": s}
                                for p, s in zip(self.paths, self.scalings)],
                "views": len(self.views)}  # fmt: skip


def scale_verifier_chips(chips: np.ndarray, scaling: str) -> np.ndarray:
    """Raw chips (N, 5, 3, S, S) in ``BRANCHES`` order scaled as a member trained with ``scaling`` expects:
    ``minmax`` bit for bit as the scan (:func:`~fusionkern.scan.tiles.scale_chips`), ``physical`` by
    :func:`~fusionkern.data.transforms.physical_scale` per branch."""
    from fusionkern import BRANCHES
    from fusionkern.data.transforms import physical_scale
    from fusionkern.scan.tiles import scale_chips

    if scaling_name(scaling) == "minmax":
        return scale_chips(chips)
    return np.stack([physical_scale(chips[:, k], branch) for k, branch in enumerate(BRANCHES)], axis=1)


def recentred_chips(
    reader: Any, grid: Any, chip_px: int, points: Sequence[tuple[float, float]], scale: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Chips centred on grid-CRS points, read with the scan's own reader; and which could be read whole.

    Args:
        reader: An open :class:`~fusionkern.scan.tiles.StackReader`.
        grid: The scan grid.
        chip_px: Chip side in pixels.
        points: Grid-CRS (x, y) centres.
        scale: Min-max scale them as the scan does; False: the calibrated bands as read.

    Returns:
        float32 (N, 5, 3, S, S) chips, scaled as in training unless ``scale`` is False (zeros where unreadable),
        and a bool (N,) mask of the chips without nodata or cloud.
    """
    from fusionkern.scan.tiles import scale_chips

    chips = np.zeros((len(points), 5, 3, chip_px, chip_px), dtype=np.float32)
    valid = np.zeros(len(points), dtype=bool)
    inverse = ~grid.affine
    for index, (x, y) in enumerate(points):
        col, row = inverse * (x, y)
        top, left = int(math.floor(row - chip_px / 2 + 0.5)), int(math.floor(col - chip_px / 2 + 0.5))
        if top < 0 or left < 0 or top + chip_px > grid.height or left + chip_px > grid.width:
            continue
        data = reader.read(top, left, chip_px, chip_px)
        if data.nodata.any() or data.cloud.any():
            continue
        chips[index] = scale_chips(data.stack) if scale else data.stack
        valid[index] = True
    return chips, valid


def read_recentred(
    inputs: Any, grid: Any, layout: Any, points: Sequence[tuple[float, float]], threads: int = 2, scale: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`recentred_chips` read by a few threads, each with its own rasters (GDAL releases the GIL), each
    thread one band of the region; chips come back in the order of ``points``."""
    from concurrent.futures import ThreadPoolExecutor

    from fusionkern.scan.tiles import StackReader

    def read(part: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
        with StackReader(inputs, grid, layout) as reader:
            return recentred_chips(reader, grid, layout.chip_px, part, scale)

    points = list(points)
    # Each thread takes one band of the region, north to south, so that a compressed block the rasters hold is
    # decoded by one thread's rasters only (GDAL caches blocks per open dataset), not by every thread's.
    order = sorted(range(len(points)), key=lambda k: (-points[k][1], points[k][0]))
    n_parts = max(1, min(threads, len(points)))
    bounds = np.linspace(0, len(points), n_parts + 1).round().astype(int)
    parts = [order[bounds[k] : bounds[k + 1]] for k in range(n_parts)]
    with ThreadPoolExecutor(n_parts) as pool:
        results = list(pool.map(read, [[points[i] for i in part] for part in parts]))
    chips = np.zeros((len(points), 5, 3, layout.chip_px, layout.chip_px), dtype=np.float32)
    valid = np.zeros(len(points), dtype=bool)
    for part, (part_chips, part_valid) in zip(parts, results):
        chips[part], valid[part] = part_chips, part_valid
    return chips, valid
