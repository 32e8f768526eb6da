"""Parity of an exported artefact with the reference model: the same inputs through both, the differences measured.

:func:`check_parity` feeds fresh random sites and, where the real Landsat-8 clips are present, chips cut from them
through the reference PyTorch model and through the artefact (onnxruntime for ``.onnx``, TensorRT for an engine),
and reports, per kind of input and overall:

* ``max_abs_logit``: the largest ``|artefact - reference|`` over all logits;
* ``max_rel_logit``: ``max |artefact - reference| / max |reference|`` over the logits of one kind of input: the
  error relative to the scale of the logits (an element-wise ratio would blow up at logits that happen to be near
  zero, where rounding is largest relative to the value and says nothing about the artefact);
* ``max_prob_diff``: the largest difference of softmax probabilities;
* ``class_agreement``: the share of sites whose predicted class (arg-max) is the same, and ``tie_margin``: the
  largest reference logit margin (top-1 minus top-2) among the sites whose class differs (0 when none does), which
  tells a near-tie flip from a real disagreement.

:class:`Tolerance` holds the goals (fp32: relative logit error at most 1e-4 and every class identical; fp16:
probabilities within 1e-2 and at least 99.9 % identical classes), where a site whose reference is a near tie (its
top-2 probabilities within 1e-5 for fp32, 2e-2 for fp16) does not count against the class goal: see
:class:`Tolerance`. :attr:`ParityReport.passed` applies them; the raw agreement is reported beside.

Real chips: each clip folder's b10, b11, b7, b6 and b76 = b7 / b6, cut into ``chip_px`` windows at half-chip
stride; one scene stands in for all three dates of a branch; each chip is min-max scaled per channel as training
data is, then resized to the model's input size by ``model.prepare``.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from fusionkern import BRANCHES
from fusionkern.errors import ConfigError, FusionkernError, InputError
from fusionkern.export.onnx import onnx_session, read_metadata
from fusionkern.models.networks import FusionNet

__all__ = [
    "ENGINE_SUFFIXES",
    "ParityError",
    "ParityReport",
    "ParityRow",
    "Tolerance",
    "artefact_kind",
    "check_parity",
    "default_landsat8_dir",
    "random_sites",
    "real_chips",
]

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
SINGLE_INPUT_BRANCH = "b76"  # the branch a single-input model is fed when the checkpoint does not say


class ParityError(FusionkernError):
    """An exported artefact does not compute what the reference model computes (within tolerance)."""


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria; a ``None`` bound is not checked.

    ``tie_band``: a site whose reference top-2 probabilities are closer than this is a near tie, and a different
    class there does not count against ``min_class_agreement`` (it is still reported in the raw agreement). Random
    sites put some sites at any margin, however small, and there the arg-max is decided by rounding: for fp32 the
    band is 1e-5, ties at float32 precision (two PyTorch runs with different thread counts already differ by a few
    1e-6 in the logits); for fp16 it is twice the probability bound, since an artefact within ``max_prob_diff`` of
    every reference probability can only flip such sites.
    """

    max_rel_logit: float | None = None
    max_abs_logit: float | None = None
    max_prob_diff: float | None = None
    min_class_agreement: float = 1.0
    tie_band: float = 0.0

    @classmethod
    def for_precision(cls, precision: str) -> Tolerance:
        """The goals: fp32 relative logits <= 1e-4 and identical classes; fp16 probabilities <= 1e-2 and >= 99.9 %
        identical classes outside near ties."""
        if precision == "fp32":
            return cls(max_rel_logit=1e-4, min_class_agreement=1.0, tie_band=1e-5)
        if precision == "fp16":
            return cls(max_prob_diff=1e-2, min_class_agreement=0.999, tie_band=2e-2)
        raise ConfigError(f"no parity tolerance for precision {precision!r}; expected fp32 or fp16")


@dataclass(frozen=True)
class ParityRow:
    """Differences on one kind of input (``random`` or ``real:<clip folder>``)."""

    kind: str
    n: int
    max_abs_logit: float
    max_rel_logit: float
    max_prob_diff: float
    class_agreement: float
    n_mismatch: int = 0  # sites whose predicted class differs
    n_near_tie: int = 0  # ... of which the reference's top-2 probabilities are within the tie band
    tie_margin: float = 0.0  # the largest reference logit margin among the sites whose class differs


@dataclass
class ParityReport:
    """Parity of ``artefact`` (run by ``backend``) with the reference, per input kind and overall."""

    artefact: str
    backend: str
    precision: str
    tolerance: Tolerance
    rows: list[ParityRow]
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(r.n for r in self.rows)

    @property
    def max_abs_logit(self) -> float:
        return max((r.max_abs_logit for r in self.rows), default=math.nan)

    @property
    def max_rel_logit(self) -> float:
        return max((r.max_rel_logit for r in self.rows), default=math.nan)

    @property
    def max_prob_diff(self) -> float:
        return max((r.max_prob_diff for r in self.rows), default=math.nan)

    @property
    def class_agreement(self) -> float:
        n = self.n
        return 1 - sum(r.n_mismatch for r in self.rows) / n if n else math.nan

    @property
    def decisive_agreement(self) -> float:
        """Share of sites whose class is the same or whose reference is a near tie (see :class:`Tolerance`)."""
        n = self.n
        return 1 - sum(r.n_mismatch - r.n_near_tie for r in self.rows) / n if n else math.nan

    @property
    def tie_margin(self) -> float:
        return max((r.tie_margin for r in self.rows), default=0.0)

    def failures(self) -> list[str]:
        """What misses the tolerance, one phrase each (empty when it passes)."""
        t, out = self.tolerance, []
        if not self.rows or self.n == 0:
            return ["no site was compared"]
        for name, bound in (("max_rel_logit", t.max_rel_logit), ("max_abs_logit", t.max_abs_logit),
                            ("max_prob_diff", t.max_prob_diff)):  # fmt: skip
            value = getattr(self, name)
            if bound is not None and not value <= bound:  # NaN fails too
                out.append(f"{name} {value:.3g} > {bound:.3g}")
        if not self.decisive_agreement >= t.min_class_agreement:
            what = "class agreement" + (" outside near ties" if t.tie_band else "")
            out.append(f"{what} {100 * self.decisive_agreement:.2f} % < {100 * t.min_class_agreement:.2f} %")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def summary(self) -> str:
        """One line: the overall figures and the verdict."""
        verdict = "passed" if self.passed else "FAILED (" + "; ".join(self.failures()) + ")"
        n_differ = sum(r.n_mismatch for r in self.rows)
        n_ties = sum(r.n_near_tie for r in self.rows)
        ties = f" ({n_differ} differ, {n_ties} of them near ties; reference logit margin <= {self.tie_margin:.3g})"
        ties = ties if n_differ else ""
        return (
            f"parity {verdict}: {self.n} sites, max |d logit| {self.max_abs_logit:.3g}, "
            f"max rel {self.max_rel_logit:.3g}, max |d prob| {self.max_prob_diff:.3g}, "
            f"classes identical {100 * self.class_agreement:.2f} %{ties}"
        )

    def table(self) -> str:
        """A plain-text table, one row per input kind."""
        head = (
            f"{'input':<48} {'sites':>6} {'max|dlogit|':>12} {'max rel':>10} {'max|dprob|':>11} {'classes':>8}"
            f" {'tie margin':>10}"
        )
        lines = [head]
        for r in self.rows:
            lines.append(
                f"{r.kind[:48]:<48} {r.n:>6} {r.max_abs_logit:>12.3g} {r.max_rel_logit:>10.3g} "
                f"{r.max_prob_diff:>11.3g} {100 * r.class_agreement:>7.2f}% {r.tie_margin:>10.3g}"
            )
        return "\n".join(lines + self.notes)

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (for the export sidecar)."""
        return {
            "artefact": self.artefact,
            "backend": self.backend,
            "precision": self.precision,
            "passed": self.passed,
            "n": self.n,
            "max_abs_logit": self.max_abs_logit,
            "max_rel_logit": self.max_rel_logit,
            "max_prob_diff": self.max_prob_diff,
            "class_agreement": self.class_agreement,
            "decisive_agreement": self.decisive_agreement,
            "tie_margin": self.tie_margin,
            "tolerance": asdict(self.tolerance),
            "rows": [asdict(r) for r in self.rows],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def _minmax_planes(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def random_sites(model: nn.Module, n: int, seed: int | None = None) -> torch.Tensor:
    """``n`` random inputs for ``model`` at its input size, every (H, W) plane min-max scaled to [0, 1]."""
    g = torch.Generator().manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**63))
    size = model.input_size
    channels = getattr(model, "config", {}).get("in_channels", 3)
    shape = (n, len(BRANCHES), 3, size, size) if isinstance(model, FusionNet) else (n, channels, size, size)
    return _minmax_planes(torch.rand(shape, generator=g))


def default_landsat8_dir() -> Path | None:
    """The shared real clips: ``$FUSIONKERN_SHARED_DATA/landsat8``, else ``../shared/data/landsat8`` beside the
    working directory or beside the source checkout; None when none of them exists."""
    candidates = []
    if os.environ.get("FUSIONKERN_SHARED_DATA"):
        candidates.append(Path(os.environ["FUSIONKERN_SHARED_DATA"]) / "landsat8")
    candidates.append(Path.cwd().parent / "shared" / "data" / "landsat8")
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "landsat8")
    return next((c for c in candidates if c.is_dir()), None)


def _windows(height: int, width: int, size: int) -> Iterator[tuple[int, int]]:
    stride = max(1, size // 2)
    for top in range(0, height - size + 1, stride):
        for left in range(0, width - size + 1, stride):
            yield top, left


def real_chips(folder: str | os.PathLike, chip_px: int = 35) -> list[tuple[str, np.ndarray]]:
    """Chips cut from every clip folder in ``folder``: ``[(clip name, (n, 5, 3, chip_px, chip_px) float32)]``.

    The five branches in ``BRANCHES`` order from one scene (repeated for the three dates), min-max scaled per chip
    and channel. Clips smaller than a chip, and chips with a branch that has no valid pixel, are left out.

    Raises:
        MissingDependencyError: rasterio (the ``geo`` extra) is not installed.
        InputError: ``folder`` does not exist, or a clip's band cannot be read (the message names the file).
    """
    from fusionkern import landsat, readers
    from fusionkern.data.transforms import minmax_scale

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"folder of real Landsat-8 clips not found: {folder}")
    out = []
    for clip in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        bands = {b: readers.read_scene_band(clip, int(b[1:]))[0] for b in ("b10", "b11", "b7", "b6")}
        bands["b76"] = landsat.band_ratio(bands["b7"], bands["b6"])
        height, width = bands["b10"].shape
        if any(v.shape != (height, width) for v in bands.values()):
            raise InputError(f"clip {clip} has bands of different sizes: {[v.shape for v in bands.values()]}")
        chips = []
        for top, left in _windows(height, width, chip_px):
            cut = np.stack([bands[b][top : top + chip_px, left : left + chip_px] for b in BRANCHES])
            if not np.isfinite(cut).reshape(len(BRANCHES), -1).any(axis=1).all():
                continue
            chips.append(minmax_scale(np.repeat(cut[:, None], 3, axis=1)))
        if chips:
            out.append((clip.name, np.stack(chips)))
    return out


def _real_inputs(
    model: nn.Module, source: bool | str | os.PathLike, notes: list[str]
) -> list[tuple[str, torch.Tensor]]:
    if source is False or source is None:
        return []
    if source is True:
        folder = default_landsat8_dir()
        if folder is None:
            notes.append("real chips: no ../shared/data/landsat8 folder found, skipped")
            return []
        try:
            import rasterio  # noqa: F401
        except ImportError:
            notes.append("real chips: rasterio (the geo extra) is not installed, skipped")
            return []
    else:
        folder = Path(source)
    chip_px = int(getattr(model, "checkpoint", {}).get("data", {}).get("chip_px") or model.preset.chip_px)
    branch = getattr(model, "checkpoint", {}).get("data", {}).get("branch") or SINGLE_INPUT_BRANCH
    inputs = []
    for clip, chips in real_chips(folder, chip_px):
        x = torch.from_numpy(chips)
        if not isinstance(model, FusionNet):
            x = x[:, BRANCHES.index(branch)]
        inputs.append((f"real:{clip}", model.prepare(x)))
    if not inputs:
        notes.append(f"real chips: no clip in {folder} yields a {chip_px} px chip")
    return inputs


# --------------------------------------------------------------------------------------------------------------
# Running both sides
# --------------------------------------------------------------------------------------------------------------


def artefact_kind(path: str | os.PathLike) -> str:
    """``"onnx"`` or ``"tensorrt"`` from the file name."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    raise ConfigError(f"cannot tell the artefact type of {path}: expected .onnx or one of {ENGINE_SUFFIXES}")


def _onnx_runner(path: Path, expected: tuple[int, ...]) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    session = onnx_session(path)
    (inp,) = session.get_inputs()
    shape = tuple(inp.shape)
    if len(shape) != len(expected) or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected[1:])):
        raise InputError(f"{path} takes input {inp.name} of shape {list(shape)}, the model takes {list(expected)}")
    dtype = np.float16 if "float16" in inp.type else np.float32
    out_name = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([out_name], {inp.name: x.astype(dtype, copy=False)})[0], dtype=np.float32)

    precision = read_metadata(path).get("precision") or ("fp16" if dtype == np.float16 else "fp32")
    return run, precision


def _engine_runner(path: Path, expected: tuple[int, ...]) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    from fusionkern.export.tensorrt import EngineRunner

    runner = EngineRunner(path)
    shape = runner.input_shape
    if len(shape) != len(expected) or any(d >= 0 and d != e for d, e in zip(shape[1:], expected[1:])):
        raise InputError(
            f"{path} takes input {runner.input_name} of shape {list(shape)}, the model takes {list(expected)}"
        )
    return runner.run, runner.precision


def _compare(kind: str, ref: np.ndarray, out: np.ndarray, tie_band: float) -> ParityRow:
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    if not np.isfinite(out64).all():
        return ParityRow(kind, len(ref), math.inf, math.inf, math.inf, 0.0, len(ref), 0, math.inf)
    diff = np.abs(out64 - ref64)
    scale = max(float(np.abs(ref64).max()), float(np.finfo(np.float32).tiny))
    p_ref = torch.softmax(torch.from_numpy(ref64), 1).numpy()
    p_out = torch.softmax(torch.from_numpy(out64), 1).numpy()
    differ = ref64.argmax(1) != out64.argmax(1)
    top2 = np.sort(ref64, axis=1)[:, -2:] if ref64.shape[1] > 1 else np.zeros((len(ref64), 2))
    margins = top2[:, 1] - top2[:, 0]
    p_top2 = np.sort(p_ref, axis=1)[:, -2:] if p_ref.shape[1] > 1 else np.zeros((len(p_ref), 2))
    near_tie = (p_top2[:, 1] - p_top2[:, 0]) < tie_band
    return ParityRow(
        kind=kind,
        n=len(ref),
        max_abs_logit=float(diff.max()),
        max_rel_logit=float(diff.max() / scale),
        max_prob_diff=float(np.abs(p_out - p_ref).max()),
        class_agreement=float(1 - differ.mean()),
        n_mismatch=int(differ.sum()),
        n_near_tie=int((differ & near_tie).sum()),
        tie_margin=float(margins[differ].max()) if differ.any() else 0.0,
    )


@torch.no_grad()
def _batched(fn: Callable[[Any], Any], x: torch.Tensor, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)])


def check_parity(
    model: nn.Module,
    artefact_path: str | os.PathLike,
    *,
    n_random: int = 1000,
    batch: int = 64,
    real_chips: bool | str | os.PathLike = True,
    seed: int | None = None,
    tolerance: Tolerance | None = None,
) -> ParityReport:
    """Run the artefact and the reference on the same inputs and measure the differences.

    Args:
        model: The reference model the artefact was exported from (evaluated in eval mode, float32, on the CPU).
        artefact_path: An ``.onnx`` file (run with onnxruntime) or a TensorRT engine (``.engine``/``.plan``/
            ``.trt``, run with :class:`~fusionkern.export.tensorrt.EngineRunner`).
        n_random: Random sites (fresh unless ``seed`` is given).
        batch: Sites per call on either side (the artefact must accept it: at most its max batch).
        real_chips: True: chips from the shared Landsat-8 clips where present (skipped, with a note, where not);
            a folder: chips from that folder (it must exist); False: random sites only.
        seed: Seed of the random sites.
        tolerance: Pass criteria (default: :meth:`Tolerance.for_precision` of the artefact's precision).

    Returns:
        The :class:`ParityReport`; check :attr:`~ParityReport.passed` (nothing is raised for a failing artefact).

    Raises:
        InputError: The artefact is missing, corrupted, or takes another input shape than the model.
        MissingDependencyError: The runtime for the artefact (onnxruntime, TensorRT) is not installed.
    """
    path = Path(artefact_path)
    if n_random < 0 or batch < 1:
        raise ConfigError(f"n_random must be >= 0 and batch >= 1, got {n_random} and {batch}")
    kind = artefact_kind(path)
    if not path.is_file():
        raise InputError(f"{'ONNX file' if kind == 'onnx' else 'TensorRT engine'} not found: {path}")
    reference = copy.deepcopy(model).to("cpu", torch.float32).eval()  # the caller's model is left as it is
    expected = tuple(random_sites(reference, 1, seed=0).shape)
    run, precision = (_onnx_runner if kind == "onnx" else _engine_runner)(path, expected)
    tolerance = tolerance or Tolerance.for_precision(precision)
    notes: list[str] = []
    inputs = [("random", random_sites(reference, n_random, seed))] if n_random else []
    inputs += _real_inputs(reference, real_chips, notes)
    rows = []
    for name, x in inputs:
        ref = _batched(lambda t: reference(t).numpy(), x, batch)
        out = _batched(lambda t: run(t.numpy()), x, batch)
        if out.shape != ref.shape:
            raise InputError(f"{path} returns logits of shape {out.shape[1:]}, the model {ref.shape[1:]}")
        rows.append(_compare(name, ref, out, tolerance.tie_band))
    return ParityReport(
        artefact=str(path),
        backend="onnxruntime" if kind == "onnx" else "tensorrt",
        precision=precision,
        tolerance=tolerance,
        rows=rows,
        notes=notes,
    )
