"""ONNX export of a fusionkern model, and onnxruntime sessions over the result.

:func:`to_onnx` exports the export-safe form (:func:`fusionkern.export.exportable.exportable`) with torch's
``torch.export``-based exporter: one input, ``sites`` (B, 5, 3, S, S) for FusionNet or ``chips`` (B, 3, S, S) for a
single-input model, one output ``logits`` (B, num_classes), the batch axis dynamic and named ``batch``. The file is
checked with ``onnx.checker.check_model(..., full_check=True)`` and its operators against :data:`ALLOWED_OPS`
before it replaces anything at the destination.

Precision ``fp16``: every weight and every intermediate tensor is float16, the graph's input and output stay
float32 (a ``Cast`` after the input and before the output), so callers feed the same float32 arrays whatever the
precision. TensorRT 11 builds such a graph as it is (strong typing: the precision is the ONNX's); onnxruntime's CPU
provider computes float16 nodes that it has no float16 kernel for in float32.

The model's description travels inside the file as ``metadata_props`` (``fusionkern.*`` keys, see
:func:`read_metadata`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fusionkern import BRANCHES, CLASSES, __version__
from fusionkern.errors import ConfigError, FusionkernError, InputError, MissingDependencyError
from fusionkern.files import atomic_output
from fusionkern.export.exportable import Fp16Body, exportable
from fusionkern.models.checkpoint import SCALING

__all__ = [
    "ALLOWED_OPS",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_OPSET",
    "PRECISIONS",
    "input_name",
    "onnx_session",
    "read_metadata",
    "to_onnx",
]

DEFAULT_OPSET = 18
DEFAULT_MAX_BATCH = 4096
PRECISIONS = ("fp32", "fp16")
OUTPUT_NAME = "logits"
METADATA_PREFIX = "fusionkern."

# Every operator the exported graphs may contain, all from the default ONNX domain. Anything else (a custom
# domain, an op a runtime may lack) fails the export.
ALLOWED_OPS = frozenset({
    "Add", "AveragePool", "Cast", "Concat", "Constant", "Conv", "Flatten", "Gemm", "GlobalAveragePool",
    "GlobalMaxPool", "MatMul", "MaxPool", "Mul", "ReduceMax", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid",
    "Slice", "Sub", "Transpose", "Unsqueeze", "Squeeze", "Identity",
})  # fmt: skip
_STANDARD_DOMAINS = ("", "ai.onnx")


def _onnx() -> ModuleType:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MissingDependencyError("onnx", "export", "ONNX export") from exc
    return onnx


def _require_exporter() -> None:
    """torch's ``torch.export``-based ONNX exporter (2.6 or newer) translates aten ops with onnxscript."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6):
        raise FusionkernError(f"ONNX export needs torch 2.6 or newer (the torch.export-based exporter); this is "
                              f"torch {torch.__version__}")  # fmt: skip
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MissingDependencyError("onnxscript", "export", "ONNX export with torch.onnx") from exc


def input_name(model: nn.Module) -> str:
    """``sites`` for FusionNet (and its export-safe form), ``chips`` for a single-input model."""
    cls = getattr(model, "source_class", type(model).__name__)
    return "sites" if cls == "FusionNet" else "chips"


def _input_shape(model: nn.Module, batch: int) -> tuple[int, ...]:
    size = model.input_size
    if getattr(model, "source_class", type(model).__name__) == "FusionNet":
        return (batch, len(BRANCHES), 3, size, size)
    return (batch, model.config.get("in_channels", 3), size, size)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx logs registration notices and deprecation warnings that say nothing about this model."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
            yield
    finally:
        logger.setLevel(level)


def _metadata(model: nn.Module, source: nn.Module, precision: str, opset: int, max_batch: int) -> dict[str, str]:
    """What a consumer needs to feed the graph, as ``fusionkern.*`` string properties."""
    data = dict(getattr(source, "checkpoint", {}).get("data", {}) or {})
    preset = getattr(source, "preset", None)
    fields: dict[str, Any] = {
        "model_class": model.source_class,
        "model_config": model.config,
        "preset": model.config.get("preset"),
        "input_name": input_name(model),
        "input_size": model.input_size,
        "chip_px": data.get("chip_px", getattr(preset, "chip_px", None)),
        "scaling": data.get("scaling", SCALING),
        "branches": list(BRANCHES) if model.source_class == "FusionNet" else data.get("branch"),
        "classes": list(CLASSES),
        "precision": precision,
        "io_dtype": "float32",
        "opset": opset,
        "max_batch": max_batch,
        "fusionkern_version": __version__,
    }
    return {METADATA_PREFIX + k: json.dumps(v) for k, v in fields.items()}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``fusionkern.*`` properties of an exported file, decoded (``{}`` for an ONNX file from elsewhere).

    Raises:
        InputError: The file is missing or is not a readable ONNX model.
    """
    model = _load_model(path, load_weights=False)
    out = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            try:
                out[prop.key[len(METADATA_PREFIX) :]] = json.loads(prop.value)
            except ValueError:
                out[prop.key[len(METADATA_PREFIX) :]] = prop.value
    return out


def _load_model(path: str | os.PathLike, *, load_weights: bool = True):
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # protobuf's DecodeError and friends have no common public base
        raise InputError(f"{path} is not a readable ONNX model ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _check_ops(model, path: Path) -> None:
    bad = sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node
                  if n.domain not in _STANDARD_DOMAINS or n.op_type not in ALLOWED_OPS})  # fmt: skip
    if bad:
        raise ConfigError(f"export of {path.name} produced operators outside the allowed standard set: {bad}")


@torch.no_grad()
def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    max_batch: int = DEFAULT_MAX_BATCH,
    fuse_branches: bool = False,
) -> Path:
    """Export ``model`` to an ONNX file at ``path`` (written to a temporary file, checked, then renamed).

    Args:
        model: A reference model (FusionNet or a single-input model); its export-safe form is exported. An
            already export-safe module (from :func:`~fusionkern.export.exportable.exportable`) is used as it is.
        path: Destination ``.onnx`` file; its folder is created.
        opset: ONNX opset of the graph (18 or newer: the exporter's operator library starts at 18).
        precision: ``"fp32"`` or ``"fp16"`` (float16 graph with float32 input and output, see the module doc).
        max_batch: The largest batch the artefact is meant for; the batch axis stays symbolic (``batch``) and this
            bound is recorded in the file's metadata for engine builders.
        fuse_branches: FusionNet: one grouped branch network, or five separate ones (default; faster on CPU).

    Returns:
        The path written.

    Raises:
        ConfigError: Unknown precision, unsupported opset, a batch bound below 1, or a graph with
            non-standard operators.
    """
    onnx = _onnx()
    _require_exporter()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    newest = onnx.defs.onnx_opset_version()
    if not DEFAULT_OPSET <= int(opset) <= newest:
        raise ConfigError(f"opset must be between {DEFAULT_OPSET} and {newest} (onnx {onnx.__version__}), got {opset}")
    if int(max_batch) < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    safe = model if hasattr(model, "source_class") else exportable(model, fuse_branches=fuse_branches)
    graph_module: nn.Module = Fp16Body(copy.deepcopy(safe)) if precision == "fp16" else safe
    name = input_name(safe)
    # The example has two sites: torch.export specialises an axis of size 1, which would fix the batch at 1.
    example = torch.rand(_input_shape(safe, 2))
    batch = torch.export.Dim("batch", min=1, max=max(int(max_batch), 2))

    path = Path(path)
    with atomic_output(path) as tmp:
        with _quiet_exporter():
            program = torch.onnx.export(
                graph_module, (example,), None, input_names=[name], output_names=[OUTPUT_NAME],
                opset_version=int(opset), dynamo=True, dynamic_shapes=({0: batch},), external_data=False,
                optimize=True, verbose=False,
            )  # fmt: skip
        proto = program.model_proto
        del proto.metadata_props[:]
        for key, value in _metadata(safe, model, precision, int(opset), int(max_batch)).items():
            proto.metadata_props.add(key=key, value=value)
        proto.producer_name, proto.producer_version = "fusionkern", __version__
        _check_ops(proto, path)
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return path


def onnx_session(path: str | os.PathLike, *, threads: int | None = None, providers: list[str] | None = None):
    """An ``onnxruntime.InferenceSession`` over ``path``, with every graph optimisation on.

    Args:
        path: An ONNX file.
        threads: Intra-op threads (None: onnxruntime's default, one per physical core).
        providers: Execution providers in order of preference (None: ``CPUExecutionProvider``).

    Raises:
        MissingDependencyError: onnxruntime is not installed.
        InputError: The file is missing, truncated or not an ONNX model onnxruntime can load; the message names it.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MissingDependencyError("onnxruntime", "export", "Running ONNX models") from exc
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
        raise InputError(f"{path} is not an ONNX model onnxruntime can load ({_first_line(exc)})") from None
