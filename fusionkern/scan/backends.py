"""Predictors: one interface over every backend, float32 chips (B, 5, 3, S, S) -> cement probability (B,).

Chips come scaled to [0, 1] (per chip and channel, as in training), except to a predictor whose ``expects_raw`` is
True: it gets the chips as read (NaN at invalid pixels) and scales them on its device with
:func:`minmax_scale_torch`, the bit-identical torch twin of the training code's scaling. GPU predictors do that, so
that the CPU only reads and cuts.

* ``torch``: the reference model; chips are resized to the preset's input size on the device
  (``model.prepare``), in batches.
* ``triton``: the same weights on the fused Triton kernels (``model.to_backend("triton")``); needs a CUDA GPU.
* ``onnxruntime``: the model exported with :func:`fusionkern.export.to_onnx` and run by onnxruntime; chips are
  resized with torch on the CPU first when the preset needs it.
* ``tensorrt``: a TensorRT engine built from that ONNX (:func:`fusionkern.export.build_engine`) and run with
  :class:`fusionkern.export.EngineRunner`; needs TensorRT and a CUDA GPU.

Exported artefacts are cached in a folder keyed by the checkpoint's SHA-256, so that a resumed scan (and the
workers of a Ray scan on one machine) reuse them. The scan also takes what ``fusionkern export`` wrote instead of a
checkpoint: an ONNX file for ``onnxruntime``, an engine for ``tensorrt``, each with its sidecar ``<file>.json``
(:func:`load_exported`), whose SHA-256 must match the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fusionkern import BRANCHES
from fusionkern.data.transforms import SCALINGS
from fusionkern.errors import CheckpointError, ConfigError, InputError, MissingDependencyError
from fusionkern.files import sha256_file
from fusionkern.models import FusionNet, PhysicsNet, load_checkpoint
from fusionkern.models.checkpoint import SCALING

BACKENDS = ("torch", "triton", "onnxruntime", "tensorrt")
CEMENT = 0
"""Class index of cement in the model's output (``fusionkern.CLASSES``)."""


EXPORT_FORMAT = "fusionkern-export"
"""The ``format`` of the sidecar ``fusionkern export`` writes beside an ONNX file or engine."""

EXPORTED_SUFFIXES = {".onnx": ("onnx", "onnxruntime"), ".engine": ("trt", "tensorrt"), ".plan": ("trt", "tensorrt"),
                     ".trt": ("trt", "tensorrt")}  # fmt: skip
"""File suffix of an exported artefact -> its sidecar's ``artefact.format`` and the backend that runs it."""


@dataclass(frozen=True)
class _Preset:
    name: str


@dataclass
class ExportedModel:
    """An artefact of ``fusionkern export`` (ONNX file or TensorRT engine), described by its checked sidecar.

    It stands in for the FusionNet where the scan needs the model's description (chip size, preset, config).

    Attributes:
        path: The artefact.
        format: ``onnx`` or ``trt``.
        backend: The backend that runs it (``onnxruntime`` or ``tensorrt``).
        sidecar: The sidecar's contents.
        config: The exported model's constructor arguments.
        input_size: The side of the images the artefact takes.
        checkpoint: ``{"path", "data", "metadata"}``, as a loaded checkpoint has them.
        model_class: The exported model's class name.
    """

    path: Path
    format: str
    backend: str
    sidecar: dict[str, Any] = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict)
    input_size: int = 0
    checkpoint: dict[str, Any] = field(default_factory=dict, repr=False)
    model_class: str = "FusionNet"

    @property
    def preset(self) -> _Preset:
        """The exported model's preset (its ``name``)."""
        return _Preset(str(self.config.get("preset")))


def load_exported(path: str | os.PathLike, backend: str | None = None) -> ExportedModel:
    """Reads an exported FusionNet and its sidecar ``<path>.json``, checking that they belong together.

    Args:
        path: An ``.onnx`` file, or a ``.engine`` / ``.plan`` / ``.trt`` TensorRT engine.
        backend: The backend asked for (None: do not check).

    Returns:
        The artefact's description.

    Raises:
        ConfigError: The artefact is not what ``backend`` runs.
        CheckpointError: No sidecar, an unreadable or foreign one, a SHA-256 that does not match the file, or a
            model that is not a FusionNet.
    """
    path = Path(path)
    fmt, runs_on = EXPORTED_SUFFIXES[path.suffix.lower()]
    if backend is not None and backend != runs_on:
        kind = "an exported ONNX model" if fmt == "onnx" else "a TensorRT engine"
        raise ConfigError(f"{path} is {kind}: scan it with --backend {runs_on} (--backend {backend} takes a "
                          "checkpoint .pt)")  # fmt: skip
    if not path.is_file():
        raise CheckpointError(f"exported model {path} does not exist")
    sidecar_path = path.with_name(path.name + ".json")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no sidecar {sidecar_path.name}: the scan takes an exported model only "
                              "with the sidecar fusionkern export wrote beside it") from None  # fmt: skip
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"sidecar {sidecar_path} is not readable JSON ({exc})") from None
    artefact = sidecar.get("artefact") if isinstance(sidecar, dict) else None
    if not isinstance(artefact, dict) or sidecar.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{sidecar_path} is not a fusionkern export sidecar (no '{EXPORT_FORMAT}' format)")
    if artefact.get("format") != fmt:
        raise CheckpointError(f"{sidecar_path} describes a {artefact.get('format')!r} artefact, {path} is {fmt!r}")
    if artefact.get("sha256") != sha256_file(path):
        raise CheckpointError(f"{path} does not match its sidecar {sidecar_path.name} (SHA-256 differs): the file "
                              "was changed or replaced after export; export it again")  # fmt: skip
    model, spec = sidecar.get("model") or {}, sidecar.get("input") or {}
    if model.get("class") != "FusionNet":
        raise CheckpointError(f"{path} holds an exported {model.get('class')}, expected a FusionNet")
    data = {
        "chip_px": spec.get("chip_px"), "input_size": spec.get("input_size"), "scaling": spec.get("scaling"),
        "branches": spec.get("branches"), "resolution_m": spec.get("resolution_m", 30.0),
    }  # fmt: skip
    checkpoint = {"path": str(path), "data": data, "metadata": {"sidecar": sidecar_path.name}}
    config = dict(model.get("config") or {})
    return ExportedModel(path, fmt, runs_on, sidecar, config, int(spec.get("input_size") or 0), checkpoint)


def load_scan_model(
    path: str | os.PathLike, preset: str | None = None, backend: str | None = None, verifier: bool = False
) -> FusionNet | ExportedModel:
    """Loads a FusionNet checkpoint, or an exported one with its sidecar, and checks that it takes what the scan
    cuts.

    Args:
        path: The checkpoint (``.pt``), or an ``.onnx`` file or TensorRT engine written by ``fusionkern export``.
        preset: The preset the scan expects (None: any).
        backend: The backend that will run it (None: do not check); an exported model runs only on its own.
        verifier: The model verifies candidates (:class:`~fusionkern.scan.decide.Verifier`), which scales the
            chips it reads by each member's own scaling: a checkpoint trained on physical units, and a
            :class:`~fusionkern.models.PhysicsNet`, are allowed too.

    Returns:
        The model, on the CPU, in eval mode, with ``model.checkpoint`` attached; or an :class:`ExportedModel`.

    Raises:
        ConfigError: An exported model given for another backend.
        CheckpointError: Not a FusionNet checkpoint (or an export whose sidecar does not match), another preset
            than ``preset``, or chips described differently (other branches or scaling) from what the scan produces.
    """
    if Path(path).suffix.lower() in EXPORTED_SUFFIXES:
        model: Any = load_exported(path, backend)
    else:
        model = load_checkpoint(path, expect=None if verifier else FusionNet)
        if not isinstance(model, (FusionNet, PhysicsNet)):
            raise CheckpointError(f"{path} holds a {type(model).__name__}, expected a FusionNet or a PhysicsNet")
    data = model.checkpoint["data"]
    if preset is not None and model.preset.name != preset:
        raise CheckpointError(f"{path} holds a FusionNet of the '{model.preset.name}' preset, not '{preset}'")
    if data.get("scaling") not in ({SCALING, SCALINGS["physical"]} if verifier else {SCALING}):
        hint = ("; use it as a verifier of a min-max checkpoint's candidates (fusionkern scan CHECKPOINT --verify "
                "PATH, fusionkern calibrate CHECKPOINT --verify PATH)" if data.get("scaling") == SCALINGS["physical"]
                else "")  # fmt: skip
        raise CheckpointError(
            f"{path} was trained on chips scaled by {data.get('scaling')!r}, the scan gives {SCALING!r}{hint}"
        )
    if list(data.get("branches") or []) != list(BRANCHES):
        raise CheckpointError(f"{path} takes branches {data.get('branches')}, the scan gives {list(BRANCHES)}")
    if int(data.get("chip_px", 0)) < 1 or float(data.get("resolution_m", 0)) <= 0:
        raise CheckpointError(f"{path} does not say its chip size (data.chip_px, data.resolution_m)")
    return model


def chip_metres(model: nn.Module) -> float:
    """The side of the model's chips in metres (``chip_px * resolution_m`` from the checkpoint)."""
    data = model.checkpoint["data"]
    return float(data["chip_px"]) * float(data["resolution_m"])


def minmax_scale_torch(x: torch.Tensor) -> torch.Tensor:
    """:func:`fusionkern.data.transforms.minmax_scale` in torch, on the chips' device, bit for bit the same.

    The same float64 arithmetic in the same order (IEEE subtraction and division are correctly rounded on CPUs and
    CUDA GPUs alike), so chips scaled on a GPU equal chips scaled by the training code. It lets a GPU scan scale its
    batches on the device instead of on the CPU, where scaling would limit a fast model.

    Args:
        x: (..., H, W) float tensor, NaN (or any non-finite value) at invalid pixels.

    Returns:
        float32 tensor of the same shape, each (H, W) plane scaled to [0, 1], 0 at invalid pixels.
    """
    x = x.to(torch.float64)
    finite = torch.isfinite(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    inf = torch.full((), float("inf"), dtype=x.dtype, device=x.device)
    lo = torch.where(finite, x, inf).amin(dim=(-2, -1), keepdim=True)
    hi = torch.where(finite, x, -inf).amax(dim=(-2, -1), keepdim=True)
    has_data = torch.isfinite(lo)
    lo, hi = torch.where(has_data, lo, zero), torch.where(has_data, hi, zero)
    span = hi - lo
    usable = torch.isfinite(span) & (span > 0)
    span = torch.where(usable, span, torch.ones((), dtype=x.dtype, device=x.device))
    scaled = torch.where(finite & usable, (torch.where(finite, x, zero) - lo) / span, zero)
    return scaled.clamp_(0.0, 1.0).to(torch.float32)


def _softmax_cement(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return (weights[:, CEMENT] / weights.sum(axis=1)).astype(np.float32)


class TorchPredictor:
    """The reference model (or its Triton form) on a torch device.

    Chips reach it one of two ways: as numpy batches (``__call__``, scaled on the host, or raw when
    ``expects_raw``), or, in a scan, cut and scaled on its own device from whole tile windows by the engine's
    :class:`~fusionkern.scan.feed.ChipFeed` (``score_tensor``; ``feed_device`` says where).

    On CUDA every batch runs at one fixed shape (``batch_size``; a last partial batch is padded, its padding
    dropped), replayed from a CUDA graph captured on first use, so that launch overhead does not bound a small
    model; ``precision="bf16"`` runs the model under ``torch.autocast`` in bfloat16. On a CPU batches run as they
    come, in float32.

    Args:
        model: A FusionNet in eval mode.
        device: Where it runs.
        scale_on_device: Take raw chips (NaN at invalid pixels) in ``__call__`` and scale them on the device with
            :func:`minmax_scale_torch` (``expects_raw``); default: on CUDA devices, where CPU-side scaling would
            hold a fast model back.
        batch_size: The fixed batch shape on CUDA (the scan's ``--batch-size``).
        precision: ``fp32`` (torch's own settings decide TF32) or ``bf16`` (autocast; CUDA only).
        graphs: Capture CUDA graphs (default: on CUDA devices).

    Raises:
        ConfigError: An unknown precision, or bf16 off CUDA.
    """

    name = "torch"

    def __init__(
        self,
        model: FusionNet,
        device: torch.device | str = "cpu",
        scale_on_device: bool | None = None,
        batch_size: int = 256,
        precision: str = "fp32",
        graphs: bool | None = None,
    ):
        self.device = torch.device(device)
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16 for the {self.name} backend, got {precision!r}")
        if precision == "bf16" and self.device.type != "cuda":
            raise ConfigError(
                f"precision bf16 needs a CUDA device for the {self.name} backend (this one: {self.device})"
            )
        self.model = model.to(self.device).eval()
        self.input_size = model.input_size
        self.expects_raw = self.device.type == "cuda" if scale_on_device is None else bool(scale_on_device)
        self.feed_device = self.device
        self.batch_size, self.precision = int(batch_size), precision
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs) and self.device.type == "cuda"
        self._graph: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        self.graph_error: str | None = None

    @torch.inference_mode()
    def __call__(self, chips: np.ndarray) -> np.ndarray:
        """float32 (B, 5, 3, S, S) -> cement probability (B,); chips in [0, 1], or raw if ``expects_raw``."""
        x = torch.from_numpy(np.ascontiguousarray(chips, dtype=np.float32)).to(self.device, non_blocking=True)
        if self.expects_raw:
            x = minmax_scale_torch(x)
        return self.score_tensor(x)

    @torch.inference_mode()
    def score_tensor(self, x: torch.Tensor) -> np.ndarray:
        """(B, 5, 3, S, S) float32 chips in [0, 1] on the device -> cement probability (B,) as numpy."""
        if self.graphs and 0 < len(x) <= self.batch_size:
            return self._replay(x)
        return self._probabilities(x).cpu().numpy()

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        # no autocast weight cache: a CUDA graph would capture casts the cache frees after the first pass
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.precision == "bf16", cache_enabled=False):
            logits = self.model(self.model.prepare(x))
        return torch.softmax(logits.float(), dim=1)[:, CEMENT]

    def _replay(self, x: torch.Tensor) -> np.ndarray:
        if self._graph is None or self._graph[1].shape[1:] != x.shape[1:]:
            try:
                self._graph = self._capture(x.shape[1:])
            except RuntimeError as exc:  # an op that cannot be captured: run eagerly, and say so in scan.json
                self.graphs, self.graph_error = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                return self._probabilities(x).cpu().numpy()
        graph, static_in, static_out = self._graph
        n = len(x)
        static_in[:n].copy_(x)
        if n < len(static_in):
            static_in[n:].fill_(0.5)  # padding: any finite chip; its scores are dropped
        graph.replay()
        return static_out[:n].cpu().numpy()

    def _capture(self, chip_shape: torch.Size) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Warms up (Triton autotuning included) on a side stream, then captures one fixed-shape forward."""
        static_in = torch.full((self.batch_size, *chip_shape), 0.5, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._probabilities(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._probabilities(static_in)
        return graph, static_in, static_out

    def describe(self) -> dict[str, Any]:
        """Backend name, device, precision and batch shape, for ``scan.json``."""
        described = {"name": self.name, "device": str(self.device), "precision": self.precision,
                     "cuda_graphs": self.graphs, "fixed_batch": self.batch_size if self.graphs else None}  # fmt: skip
        if self.graph_error:
            described["cuda_graphs_failed"] = self.graph_error
        return described


class TritonPredictor(TorchPredictor):
    """The fused Triton kernels (``model.to_backend("triton")``); CUDA only. Takes the arguments of
    :class:`TorchPredictor` (the device defaults to ``cuda``).

    Raises:
        ConfigError: No CUDA device (the kernels would only run on Triton's slow CPU interpreter).
        MissingDependencyError: Triton is not installed.
    """

    name = "triton"

    def __init__(self, model: FusionNet, device: torch.device | str = "cuda", **options: Any):  # noqa: D107
        device = torch.device(device)
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not interpreted:
            raise ConfigError(
                "--backend triton needs a CUDA GPU (this run has none, or --device is not cuda); "
                "use --backend torch or onnxruntime on a CPU"
            )
        super().__init__(model, device, **options)
        self.model.to_backend("triton")


class OnnxPredictor:
    """The exported model run by onnxruntime.

    Args:
        model: A FusionNet (exported on first use into ``cache_dir``), or an exported ONNX file.
        cache_dir: Where the ONNX file is kept.
        threads: onnxruntime intra-op threads (None: its default).
    """

    name = "onnxruntime"

    def __init__(self, model: FusionNet | ExportedModel, cache_dir: str | os.PathLike, threads: int | None = None):
        export = _export_module("The onnxruntime backend")
        self.path = model.path if isinstance(model, ExportedModel) else _cached_onnx(model, Path(cache_dir), export)
        self.session = export.onnx_session(self.path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        self.input_size = model.input_size
        self.expects_raw = False
        self.feed_device = torch.device("cpu")

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        """float32 (B, 5, 3, S, S) in [0, 1] -> cement probability (B,)."""
        x = _resized(chips, self.input_size)
        (logits,) = self.session.run(None, {self.input_name: x})
        return _softmax_cement(np.asarray(logits))

    def score_tensor(self, x: torch.Tensor) -> np.ndarray:
        """(B, 5, 3, S, S) float32 CPU tensor in [0, 1], as the scan's chip feed makes them -> probability (B,)."""
        return self(x.numpy())

    def describe(self) -> dict[str, Any]:
        """Backend name, device and artefact, for ``scan.json``."""
        return {"name": self.name, "device": "cpu", "onnx": str(self.path)}


class TensorRTPredictor:
    """A TensorRT engine built from the exported model; CUDA and TensorRT only.

    The engine is built strongly typed from the ONNX export of ``precision`` (the route ``fusionkern export`` takes)
    and cached beside it under a name carrying the precision, the batch, the TensorRT version and the GPU's compute
    capability (:func:`engine_file_name`). A cached engine this machine cannot run (built by another TensorRT or for
    another GPU model, per its sidecar, or refused by TensorRT) is rebuilt. A freshly built engine is checked against
    the reference model on :attr:`PARITY_SITES` random sites (:func:`fusionkern.export.check_parity`, the goals of
    ``precision``) and removed if it fails, so that every engine left in the cache has passed.

    Args:
        model: A FusionNet.
        cache_dir: Where the ONNX file and the engine are kept.
        batch_size: The engine profile's optimal and largest batch.
        precision: ``fp16`` or ``fp32``.

    Raises:
        ConfigError: No CUDA device.
        MissingDependencyError: TensorRT is not installed.
        ParityError: A freshly built engine fails the parity check.
    """

    name = "tensorrt"
    PARITY_SITES = 64
    """Random sites a fresh engine is checked on: the reference runs them on the CPU, once per build."""

    def __init__(self, model: FusionNet, cache_dir: str | os.PathLike, batch_size: int, precision: str = "fp16"):
        if not torch.cuda.is_available():
            raise ConfigError("--backend tensorrt needs a CUDA GPU, and this run has none; use torch or onnxruntime")
        export = _export_module("The tensorrt backend")
        from fusionkern.export import tensorrt as export_trt

        trt = export_trt.require_tensorrt("The tensorrt backend")
        cache = Path(cache_dir)
        onnx_path = _cached_onnx(model, cache, export, precision=precision)
        engine = cache / engine_file_name(precision, batch_size, str(trt.__version__), export_trt.gpu_identity())
        self.parity: dict[str, Any] | None = None  # the check of an engine built by this predictor
        self.runner = self._cached_runner(export, engine)
        if self.runner is None:
            export.build_engine(onnx_path, engine, precision=precision, opt_batch=batch_size, max_batch=batch_size)
            self.parity = self._checked_engine(export, model, engine, min(batch_size, 64), self.PARITY_SITES)
            self.runner = export.EngineRunner(engine)
        self.engine, self.input_size = engine, model.input_size
        self.expects_raw = True

    @staticmethod
    def _cached_runner(export: Any, engine: Path) -> Any:
        """A runner of the cached engine, or None where there is none or this machine cannot run it."""
        if not engine.is_file():
            return None
        try:
            return export.EngineRunner(engine)
        except InputError as exc:  # another TensorRT or GPU, no sidecar, or TensorRT cannot load it: build it again
            print(f"rebuilding the TensorRT engine: {exc}")
            return None

    @staticmethod
    def _checked_engine(export: Any, model: FusionNet, engine: Path, batch: int, sites: int) -> dict[str, Any]:
        """The parity of a freshly built engine with ``model``; the engine and its sidecar are removed if it fails."""
        report = export.check_parity(model, engine, n_random=sites, batch=batch, real_chips=False, seed=0)
        if not report.passed:
            for path in (engine, export.engine_sidecar_path(engine)):
                path.unlink(missing_ok=True)
            raise export.ParityError(
                f"the TensorRT engine built for the scan fails the parity check and was removed "
                f"({'; '.join(report.failures())})"
            )
        return report.to_dict()

    @property
    def feed_device(self) -> torch.device:
        """The engine's GPU: the scan hands tile windows there and cuts and scales the chips on it
        (:mod:`fusionkern.scan.feed`), then calls :meth:`score_tensor`."""
        return self.runner.device

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        """Raw float32 (B, 5, 3, S, S) chips, NaN at invalid pixels -> cement probability (B,).

        Chips are scaled (:func:`minmax_scale_torch`) and resized on the GPU.
        """
        x = torch.from_numpy(np.ascontiguousarray(chips, dtype=np.float32)).to(self.runner.device)
        return self.score_tensor(minmax_scale_torch(x))

    def score_tensor(self, x: torch.Tensor) -> np.ndarray:
        """(B, 5, 3, S, S) float32 chips in [0, 1] on the engine's device, as the scan's chip feed makes them
        -> cement probability (B,). Resized on the GPU."""
        from fusionkern.models import resize_chips

        logits = self.runner.run_torch(resize_chips(x, self.input_size)).float()
        return torch.softmax(logits, dim=1)[:, CEMENT].cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """Backend name, device and artefact (and the parity check of an engine built in this run), for
        ``scan.json``."""
        out = {"name": self.name, "device": str(self.runner.device), "engine": str(self.engine)}
        if self.parity is not None:
            out["parity"] = self.parity
        return out


def engine_file_name(precision: str, batch_size: int, tensorrt_version: str, gpu: dict[str, str]) -> str:
    """``model-fp16-b256-trt10.9.0.34-sm90.engine``: an engine runs only under the TensorRT version that built it,
    on the GPU it was built for, so a new TensorRT or another GPU generation gets its own file."""
    cc = str(gpu["compute_capability"]).replace(".", "")
    return f"model-{precision}-b{batch_size}-trt{tensorrt_version}-sm{cc}.engine"


class ExportedEnginePredictor(TensorRTPredictor):
    """A TensorRT engine that ``fusionkern export`` built, run as it is (its sidecar checked, nothing rebuilt).

    Raises:
        ConfigError: No CUDA device.
        MissingDependencyError: TensorRT is not installed.
        InputError: The engine was built by another TensorRT version or for another GPU (its sidecar says so).
    """

    def __init__(self, model: ExportedModel):  # noqa: D107 - the class docstring says it
        if not torch.cuda.is_available():
            raise ConfigError("--backend tensorrt needs a CUDA GPU, and this run has none; use torch or onnxruntime")
        export = _export_module("The tensorrt backend")
        if not export.tensorrt_available():
            raise MissingDependencyError("tensorrt", "trt", "The tensorrt backend")
        self.runner = export.EngineRunner(model.path)  # compares the sidecar's TensorRT and GPU with this machine
        self.engine, self.input_size = model.path, model.input_size
        self.parity = (model.sidecar.get("parity") or None)
        self.expects_raw = True


def _export_module(purpose: str) -> Any:
    try:
        import fusionkern.export as export
    except ImportError as exc:  # onnx or the exporter's dependencies missing
        raise MissingDependencyError(getattr(exc, "name", None) or "onnx", "export", purpose) from exc
    return export


def _cached_onnx(model: FusionNet, cache: Path, export: Any, precision: str = "fp32") -> Path:
    path = cache / f"model-{precision}.onnx"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        export.to_onnx(model, path, precision=precision)
    return path


def _resized(chips: np.ndarray, size: int) -> np.ndarray:
    """Chips resized to the model's input size (as ``model.prepare``), float32, C-contiguous."""
    chips = np.ascontiguousarray(chips, dtype=np.float32)
    if chips.shape[-1] == size and chips.shape[-2] == size:
        return chips
    from fusionkern.models import resize_chips

    return resize_chips(torch.from_numpy(chips), size).numpy()


def make_predictor(
    backend: str,
    model: FusionNet,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    precision: str | None = None,
) -> Any:
    """The predictor of a backend.

    Args:
        backend: One of :data:`BACKENDS`.
        model: The loaded FusionNet.
        device: Torch device for ``torch`` and ``triton``.
        cache_dir: Folder for exported artefacts (``onnxruntime``, ``tensorrt``).
        batch_size: Largest batch (the TensorRT profile; the fixed CUDA batch of ``torch`` and ``triton``).
        precision: ``fp32`` or ``bf16`` for ``torch`` and ``triton`` (default fp32), ``fp16`` or ``fp32`` for
            ``tensorrt`` (default fp16), ``fp32`` for ``onnxruntime``; None: the backend's default.

    Raises:
        ConfigError: Unknown backend, or one this machine cannot run (no CUDA for triton / tensorrt).
        MissingDependencyError: The backend's package is not installed.
    """
    if isinstance(model, ExportedModel):
        if backend != model.backend:
            raise ConfigError(f"{model.path} is an exported {model.format} model: scan it with --backend {model.backend}")
        if backend == "tensorrt":
            return ExportedEnginePredictor(model)
    if backend == "torch":
        return TorchPredictor(model, device, batch_size=batch_size, precision=precision or "fp32")
    if backend == "triton":
        return TritonPredictor(model, device, batch_size=batch_size, precision=precision or "fp32")
    if backend in ("onnxruntime", "tensorrt"):
        if cache_dir is None:
            raise ConfigError(f"the {backend} backend needs a folder for the exported model")
        if backend == "onnxruntime":
            if precision not in (None, "fp32"):
                raise ConfigError(f"the onnxruntime backend runs fp32 only, not {precision}")
            return OnnxPredictor(model, cache_dir)
        if precision not in (None, "fp16", "fp32"):
            raise ConfigError(f"precision must be fp16 or fp32 for the tensorrt backend, got {precision!r}")
        return TensorRTPredictor(model, cache_dir, batch_size, precision=precision or "fp16")
    raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
