"""TensorRT engines from the exported ONNX, and a runner that executes them (``execute_async_v3``).

* :func:`build_engine`: builder, ONNX parser, one optimisation profile over the batch axis, a timing cache that
  persists between builds. TensorRT 10 builds an fp32 ONNX with precision flags (``BuilderFlag.FP16`` for
  ``precision="fp16"``); TensorRT 11 has strongly typed networks only, so the precision is the ONNX's own and an
  fp16 engine needs the fp16 export (``to_onnx(..., precision="fp16")``). TensorRT 10 builds an fp16 ONNX strongly
  typed too.
* :class:`EngineRunner`: deserialises an engine and runs batches through it with named tensors
  (``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``) on a CUDA stream, with PyTorch owning the
  device memory.

An engine only runs under the TensorRT version that built it, on the GPU model it was built for. Every engine file
gets a sidecar ``<engine>.json`` recording both (and the build settings); :class:`EngineRunner` compares it with
the running TensorRT and GPU before deserialising and names the mismatch, instead of TensorRT's generic failure.

Everything here needs the ``tensorrt`` package and a CUDA GPU visible to PyTorch, and says so at once otherwise.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from fusionkern import __version__
from fusionkern.errors import ConfigError, FusionkernError, InputError, MissingDependencyError
from fusionkern.files import sha256_file, write_bytes_atomic

__all__ = [
    "ENGINE_FORMAT",
    "EngineRunner",
    "build_engine",
    "check_engine_compatible",
    "engine_sidecar_path",
    "gpu_identity",
    "require_tensorrt",
    "tensorrt_available",
    "tensorrt_major",
]

ENGINE_FORMAT = "fusionkern-tensorrt-engine"
DEFAULT_OPT_BATCH = 256
DEFAULT_WORKSPACE_GIB = 4.0


# --------------------------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------------------------


def tensorrt_available() -> bool:
    """Whether ``import tensorrt`` works and PyTorch sees a CUDA device (both are needed for engines)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def require_tensorrt(purpose: str) -> ModuleType:
    """The ``tensorrt`` module, after checking that a CUDA GPU is there too.

    Raises:
        MissingDependencyError: TensorRT is not installed.
        FusionkernError: No CUDA GPU is visible (a CPU-only PyTorch build, no driver, or no device).
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError("tensorrt", "trt", purpose) from exc
    if not torch.cuda.is_available():
        build = "a CPU-only PyTorch build" if torch.version.cuda is None else "no CUDA device visible"
        raise FusionkernError(f"{purpose} needs an NVIDIA GPU with CUDA, and there is none here ({build})")
    return trt


def tensorrt_major(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


def gpu_identity(device: int | None = None) -> dict[str, str]:
    """The GPU an engine is built for or run on: name and compute capability (``"9.0"``)."""
    index = torch.cuda.current_device() if device is None else int(device)
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def engine_sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def _make_logger(trt: ModuleType):
    """A TensorRT logger that prints warnings and keeps errors, so that failures can quote them."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # TensorRT's callback
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            elif severity == trt.ILogger.Severity.WARNING:
                print(f"TensorRT: {msg}")

    return _Logger()


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------


def _onnx_io(onnx_path: Path) -> tuple[str, list[int], str, dict[str, Any]]:
    """Input name, input shape (-1 for a symbolic axis), graph precision and fusionkern metadata of an ONNX file."""
    from fusionkern.export.onnx import _load_model, read_metadata

    model = _load_model(onnx_path)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise InputError(f"{onnx_path} has {len(inputs)} graph inputs; a fusionkern export has exactly one")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim]
    float16 = 10  # onnx.TensorProto.FLOAT16
    precision = "fp16" if any(t.data_type == float16 for t in model.graph.initializer) else "fp32"
    return inputs[0].name, dims, precision, read_metadata(onnx_path)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    timing_cache: str | os.PathLike | None = None,
) -> Path:
    """Build a TensorRT engine from an exported ONNX file; writes ``engine_path`` and its sidecar JSON.

    Args:
        onnx_path: An ONNX file from :func:`~fusionkern.export.onnx.to_onnx` (batch axis symbolic).
        engine_path: Where the serialised engine goes (written to a temporary file, then renamed).
        precision: ``"fp32"`` or ``"fp16"``. TensorRT 10 with an fp32 ONNX: ``"fp16"`` sets ``BuilderFlag.FP16``.
            A strongly typed build (TensorRT 11, or an fp16 ONNX) takes the ONNX's precision, which must match.
        min_batch, opt_batch, max_batch: The optimisation profile of the batch axis. ``max_batch`` defaults to
            ``opt_batch``, else 256 (or the ONNX's recorded bound if lower) and may not exceed that bound;
            ``opt_batch`` defaults to ``min(256, max_batch)``. Activation memory grows with ``max_batch``.
        workspace_gib: Builder workspace limit.
        timing_cache: Timing cache file, read if present and written back after the build (default: one per
            TensorRT version and GPU under ``$XDG_CACHE_HOME/fusionkern``).

    Returns:
        ``engine_path``.

    Raises:
        MissingDependencyError / FusionkernError: No TensorRT, or no CUDA GPU (checked first).
        InputError: The ONNX file is missing or TensorRT's parser rejects it (its errors are quoted).
        ConfigError: Bad batch bounds, or a precision the ONNX and TensorRT version cannot give.
    """
    trt = require_tensorrt("Building a TensorRT engine")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")
    name, dims, onnx_precision, meta = _onnx_io(onnx_path)
    if not dims or dims[0] != -1:
        raise InputError(f"{onnx_path} has no symbolic batch axis (input {name} shape {dims})")
    if any(d < 0 for d in dims[1:]):
        raise InputError(f"{onnx_path}: only the batch axis may be symbolic (input {name} shape {dims})")
    bound = int(meta.get("max_batch") or 0) or None  # what the ONNX was exported for
    max_batch = int(max_batch or opt_batch or min(DEFAULT_OPT_BATCH, bound or DEFAULT_OPT_BATCH))
    opt_batch = int(opt_batch or min(DEFAULT_OPT_BATCH, max_batch))
    if not 1 <= int(min_batch) <= opt_batch <= max_batch:
        raise ConfigError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    if bound and max_batch > bound:
        raise ConfigError(f"max_batch {max_batch} exceeds the {bound} that {onnx_path} was exported for")

    major = tensorrt_major(trt)
    strongly_typed = major >= 11 or onnx_precision == "fp16"
    if strongly_typed and precision != onnx_precision:
        why = (
            f"TensorRT {trt.__version__} builds strongly typed networks"
            if major >= 11
            else "an fp16 ONNX is built strongly typed"
        )
        raise ConfigError(
            f"{onnx_path} is an {onnx_precision} graph and {why}: the engine's precision is the ONNX's. "
            f"Export it with precision={precision!r} (fusionkern export --precision {precision})"
        )

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise InputError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors)[:500] or 'no detail given'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    rest = tuple(dims[1:])
    profile.set_shape(name, (int(min_batch), *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)

    gpu = gpu_identity()
    cache_path = Path(timing_cache) if timing_cache else _default_timing_cache(trt, gpu)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors)[:500] or "see the TensorRT log above"
        raise FusionkernError(f"TensorRT could not build an engine from {onnx_path} ({detail})")
    build_s = time.perf_counter() - t0
    write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))

    engine = {
        "tensorrt": str(trt.__version__),
        "gpu": gpu,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "input": {"name": name, "shape": ["batch", *rest]},
        "profile": {"min": int(min_batch), "opt": opt_batch, "max": max_batch},
        "workspace_gib": workspace_gib,
        "build_seconds": round(build_s, 2),
        "onnx_sha256": sha256_file(onnx_path),
    }
    write_bytes_atomic(engine_path, bytes(serialized))
    engine["sha256"] = sha256_file(engine_path)
    info = {"format": ENGINE_FORMAT, "engine": engine, "onnx_metadata": meta, "fusionkern_version": __version__}
    write_bytes_atomic(engine_sidecar_path(engine_path), (json.dumps(info, indent=2) + "\n").encode())
    return engine_path


def _default_timing_cache(trt: ModuleType, gpu: dict[str, str]) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusionkern"
    return root / f"tensorrt-{trt.__version__}-sm{gpu['compute_capability'].replace('.', '')}.timing-cache"


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


def check_engine_compatible(engine_path: str | os.PathLike, trt: ModuleType, device: int | None = None) -> dict:
    """The engine's sidecar, after checking that this TensorRT version and GPU can run the engine.

    The sidecar's ``engine`` block is the build record (:func:`build_engine` writes it; the export command's
    sidecar carries it too).

    Raises:
        InputError: No (readable) sidecar, or the engine was built by another TensorRT version or for another
            GPU; the message names the engine and both sides.
    """
    engine_path = Path(engine_path)
    sidecar = engine_sidecar_path(engine_path)
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{engine_path} has no {sidecar.name} recording the TensorRT version and GPU it was built for; "
            "rebuild it with fusionkern export --format trt, or pass check=False to try it anyway"
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{sidecar} is not readable JSON ({exc})") from None
    engine = info.get("engine") if isinstance(info, dict) else None
    if not isinstance(engine, dict) or "tensorrt" not in engine or "gpu" not in engine:
        raise InputError(f"{sidecar} does not describe a fusionkern TensorRT engine (no engine.tensorrt / engine.gpu)")
    here = gpu_identity(device)
    built_trt, built_gpu = str(engine["tensorrt"]), engine["gpu"] or {}
    if built_trt != str(trt.__version__):
        raise InputError(
            f"{engine_path} was built by TensorRT {built_trt}; this is TensorRT {trt.__version__}. "
            "Engines run only under the TensorRT version that built them: rebuild it here"
        )
    if built_gpu.get("compute_capability") != here["compute_capability"] or built_gpu.get("name") != here["name"]:
        raise InputError(
            f"{engine_path} was built for {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}); "
            f"this GPU is {here['name']} (sm {here['compute_capability']}). Rebuild the engine on this GPU"
        )
    return info


def _torch_dtype(trt: ModuleType, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}  # fmt: skip
    for name, torch_dtype in (("bfloat16", torch.bfloat16), ("int64", torch.int64)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = torch_dtype
    if dtype not in table:
        raise FusionkernError(f"engine tensor type {dtype} has no PyTorch equivalent")
    return table[dtype]


class EngineRunner:
    """Runs a serialised TensorRT engine with one input and one output on the current CUDA device.

    ``run(x)`` takes a (B, ...) array or tensor of any batch size (split into chunks of at most the profile's
    max batch) and returns float32 logits as a numpy array; ``run_torch(x)`` keeps a CUDA tensor on the device.

    Args:
        engine_path: The engine file.
        device: CUDA device index (default: the current device).
        check: Compare the sidecar's TensorRT version and GPU with this machine first (default True).
    """

    def __init__(self, engine_path: str | os.PathLike, *, device: int | None = None, check: bool = True):
        trt = require_tensorrt("Running a TensorRT engine")
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise InputError(f"TensorRT engine not found: {self.path}")
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else int(device))
        self.info = check_engine_compatible(self.path, trt, self.device.index) if check else {}
        self._trt = trt
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                detail = "; ".join(self._logger.errors)[:300]
                raise InputError(f"TensorRT {trt.__version__} cannot load the engine {self.path} ({detail})")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise InputError(f"{self.path} has inputs {inputs} and outputs {outputs}; expected one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        lo, opt, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.opt_batch, self.max_batch = int(lo[0]), int(opt[0]), int(hi[0])
        self.precision = self.info.get("engine", {}).get("precision") or (
            "fp16" if self.input_dtype == torch.float16 else "fp32"
        )

    def run_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` (any device, any float dtype) as a CUDA tensor in the engine's output dtype."""
        outs = [self._run_chunk(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def run(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits for ``x`` as a float32 numpy array."""
        x = torch.as_tensor(x)
        return self.run_torch(x).float().cpu().numpy()

    __call__ = run

    def _run_chunk(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if n < self.min_batch:
            pad = x[-1:].expand(self.min_batch - n, *x.shape[1:])
            return self._run_chunk(torch.cat([x, pad]))[:n]
        with torch.cuda.device(self.device):
            # Everything is queued on the current stream: later work on it sees the result, no host sync needed.
            stream = torch.cuda.current_stream(self.device)
            inp = x.to(self.device, self.input_dtype).contiguous()
            if not self.context.set_input_shape(self.input_name, tuple(inp.shape)):
                raise InputError(
                    f"{self.path} does not accept input shape {tuple(inp.shape)} (profile batch "
                    f"{self.min_batch}..{self.max_batch}, shape {self.input_shape})"
                )
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            out = torch.empty(out_shape, dtype=self.output_dtype, device=self.device)
            self.context.set_tensor_address(self.input_name, inp.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise FusionkernError(f"TensorRT failed to run {self.path}: {'; '.join(self._logger.errors)[:300]}")
        return out
