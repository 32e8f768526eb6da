"""TensorRT engines from the exported ONNX, and a runner that executes them (``execute_async_v3``).

* :func:`build_engine`: builder, ONNX parser, one optimisation profile over the batch axis, a timing cache that
  persists between builds. Every engine is built strongly typed, so its precision is the ONNX's own: an fp16 engine
  comes from the fp16 export (``to_onnx(..., precision="fp16")``). That is the one route on TensorRT 10 (with
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``) and 11 (always strongly typed; the flag is deprecated there and
  ignored), for ``fusionkern export`` and the scan alike. fp32 engines are built with ``BuilderFlag.TF32`` cleared:
  TensorRT enables TF32 by default, and TF32 convolutions miss the fp32 parity goal (relative logit error 1e-4).
* :class:`EngineRunner`: deserialises an engine and runs batches through it with named tensors
  (``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``) on its own CUDA stream, with PyTorch owning
  the device memory.

An engine only runs under the TensorRT version that built it, on the GPU model it was built for. Every engine file
gets a sidecar ``<engine>.json`` recording both (and the build settings); :class:`EngineRunner` compares it with
the running TensorRT and GPU before deserialising and names the mismatch, instead of TensorRT's generic failure.

TensorRT treats its logger as process-wide (the first one it is given serves every builder and runtime), so one
module-level logger collects the errors that failures quote. The calls that report failure by returning False or
None (``parse_from_file``, ``set_timing_cache``, ``get_timing_cache``, ``build_serialized_network``,
``deserialize_cuda_engine``, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) are all checked.

Everything here needs the ``tensorrt`` package (10 or 11) and a CUDA GPU visible to PyTorch, and says so at once
otherwise.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import threading
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
    "ALIGNMENT",
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
ALIGNMENT = 256
"""Bytes: ``set_tensor_address`` refuses (returns False for) a device pointer that is not 256-byte aligned."""
SUPPORTED_MAJORS = (10, 11)


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
    """The ``tensorrt`` module, after checking that it is TensorRT 10 or 11 and that a CUDA GPU is there too.

    Raises:
        MissingDependencyError: TensorRT is not installed.
        FusionkernError: Another TensorRT major version, or no CUDA GPU is visible (a CPU-only PyTorch build, no
            driver, or no device).
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError("tensorrt", "trt", purpose) from exc
    if tensorrt_major(trt) not in SUPPORTED_MAJORS:
        raise FusionkernError(f"{purpose} needs TensorRT 10 or 11; this is TensorRT {trt.__version__}")
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


_LOGGER: Any = None


def _logger(trt: ModuleType) -> Any:
    """The one logger handed to every builder and runtime of ``trt`` (TensorRT keeps the first logger it is given,
    so a second logger made for a later builder would never hear of that builder's errors)."""
    global _LOGGER
    if _LOGGER is None or _LOGGER.trt is not trt:
        _LOGGER = _make_logger(trt)
    return _LOGGER


def _make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that prints warnings and keeps the latest errors, numbered, so that a failure can quote
    the errors logged since it started (``errors_since(mark())``)."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.trt = trt
            self._lock = threading.Lock()  # TensorRT calls the logger from any thread and takes no lock itself
            self._count = 0
            self._recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=64)

        def log(self, severity, msg):  # TensorRT's callback
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                with self._lock:
                    self._count += 1
                    self._recent.append((self._count, str(msg)))
            elif severity == trt.ILogger.Severity.WARNING:
                print(f"TensorRT: {msg}")

        def mark(self) -> int:
            return self._count

        def errors_since(self, mark: int) -> str:
            with self._lock:
                return "; ".join(msg for i, msg in self._recent if i > mark)[:500]

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


def _batch_profile(
    onnx_path: Path, meta: dict[str, Any], min_batch: int, opt_batch: int | None, max_batch: int | None
) -> tuple[int, int, int]:
    """``(min, opt, max)`` of the batch axis, defaults filled in and checked against the ONNX's recorded bound."""
    bound = int(meta.get("max_batch") or 0) or None  # what the ONNX was exported for
    max_batch = int(max_batch or opt_batch or min(DEFAULT_OPT_BATCH, bound or DEFAULT_OPT_BATCH))
    opt_batch = int(opt_batch or min(DEFAULT_OPT_BATCH, max_batch))
    if not 1 <= int(min_batch) <= opt_batch <= max_batch:
        raise ConfigError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    if bound and max_batch > bound:
        raise ConfigError(f"max_batch {max_batch} exceeds the {bound} that {onnx_path} was exported for")
    return int(min_batch), opt_batch, max_batch


def _network_flags(trt: ModuleType) -> int:
    """``create_network`` flags for a strongly typed network.

    TensorRT 10: the STRONGLY_TYPED bit (1 << 1). TensorRT 11: none: every network is strongly typed, its
    STRONGLY_TYPED value is 0 (deprecated, ignored) and bit 1 means PREFER_JIT_PYTHON_PLUGINS.
    """
    if tensorrt_major(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str | None = None,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    timing_cache: str | os.PathLike | None = None,
) -> Path:
    """Build a strongly typed TensorRT engine from an exported ONNX file; writes ``engine_path`` and its sidecar.

    Args:
        onnx_path: An ONNX file from :func:`~fusionkern.export.onnx.to_onnx` (batch axis symbolic).
        engine_path: Where the serialised engine goes (written to a temporary file, then renamed).
        precision: ``"fp32"`` or ``"fp16"``, or None: the engine's precision is the ONNX's, and a given one must
            match it (export an fp16 engine from the fp16 ONNX).
        min_batch, opt_batch, max_batch: The optimisation profile of the batch axis. ``max_batch`` defaults to
            ``opt_batch``, else 256 (or the ONNX's recorded bound if lower) and may not exceed that bound;
            ``opt_batch`` defaults to ``min(256, max_batch)``. Activation memory grows with ``max_batch``.
        workspace_gib: Builder workspace limit.
        timing_cache: Timing cache file, read if present and written back after the engine (default: one per
            TensorRT version and GPU under ``$XDG_CACHE_HOME/fusionkern``). A cache that does not match this
            TensorRT and GPU is replaced by a fresh one.

    Returns:
        ``engine_path``.

    Raises:
        MissingDependencyError / FusionkernError: No TensorRT 10 / 11, or no CUDA GPU (checked first).
        InputError: The ONNX file is missing or TensorRT's parser rejects it (its errors are quoted).
        ConfigError: Bad batch bounds, or a precision other than the ONNX's.
        FusionkernError: TensorRT cannot build the engine (its logged errors are quoted).
    """
    trt = require_tensorrt("Building a TensorRT engine")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in (None, "fp32", "fp16"):
        raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")
    name, dims, onnx_precision, meta = _onnx_io(onnx_path)
    if precision not in (None, onnx_precision):
        raise ConfigError(
            f"{onnx_path} is an {onnx_precision} graph and engines are built strongly typed: the engine's precision "
            f"is the ONNX's. Export it with precision={precision!r} (fusionkern export --precision {precision})"
        )
    if not dims or dims[0] != -1:
        raise InputError(f"{onnx_path} has no symbolic batch axis (input {name} shape {dims})")
    if any(d < 0 for d in dims[1:]):
        raise InputError(f"{onnx_path}: only the batch axis may be symbolic (input {name} shape {dims})")
    batches = _batch_profile(onnx_path, meta, min_batch, opt_batch, max_batch)

    logger = _logger(trt)
    mark = logger.mark()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or logger.errors_since(mark)
        raise InputError(f"TensorRT cannot parse {onnx_path}: {errors[:500] or 'no detail given'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if onnx_precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; TF32 convolutions miss the fp32 parity goal
    profile = builder.create_optimization_profile()
    rest = tuple(dims[1:])
    profile.set_shape(name, *((b, *rest) for b in batches))
    config.add_optimization_profile(profile)

    gpu = gpu_identity()
    cache_path = Path(timing_cache) if timing_cache else _default_timing_cache(trt, gpu)
    _attach_timing_cache(config, cache_path)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = logger.errors_since(mark) or "see the TensorRT log above"
        raise FusionkernError(f"TensorRT could not build an engine from {onnx_path} ({detail})")
    engine = {
        "tensorrt": str(trt.__version__),
        "gpu": gpu,
        "precision": onnx_precision,
        "strongly_typed": True,
        "tf32": onnx_precision != "fp32",
        "input": {"name": name, "shape": ["batch", *rest]},
        "profile": dict(zip(("min", "opt", "max"), batches)),
        "workspace_gib": workspace_gib,
        "build_seconds": round(time.perf_counter() - t0, 2),
        "onnx_sha256": sha256_file(onnx_path),
    }
    _write_engine(engine_path, bytes(serialized), engine, meta)
    _save_timing_cache(config, cache_path)  # after the engine: a cache that cannot be saved loses no engine
    return engine_path


def _write_engine(engine_path: Path, data: bytes, engine: dict[str, Any], meta: dict[str, Any]) -> None:
    write_bytes_atomic(engine_path, data)
    engine["sha256"] = sha256_file(engine_path)
    info = {"format": ENGINE_FORMAT, "engine": engine, "onnx_metadata": meta, "fusionkern_version": __version__}
    write_bytes_atomic(engine_sidecar_path(engine_path), (json.dumps(info, indent=2) + "\n").encode())


def _default_timing_cache(trt: ModuleType, gpu: dict[str, str]) -> Path:
    """One cache per TensorRT version and GPU model: TensorRT refuses a cache from another device."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusionkern"
    cc = gpu["compute_capability"].replace(".", "")
    name = re.sub(r"[^A-Za-z0-9]+", "-", gpu["name"]).strip("-").lower() or "gpu"
    return root / f"tensorrt-{trt.__version__}-sm{cc}-{name}.timing-cache"


def _attach_timing_cache(config: Any, path: Path) -> None:
    """Give the build the cache at ``path``, or a fresh cache where that one is absent, unreadable or from another
    TensorRT or device (``create_timing_cache`` returns None, ``set_timing_cache`` False)."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        blob = b""
    except OSError as exc:
        print(f"TensorRT: cannot read the timing cache {path} ({exc}); starting a fresh one")
        blob = b""
    cache = config.create_timing_cache(blob) if blob else None
    if cache is not None and config.set_timing_cache(cache, False):
        return
    if blob:
        print(f"TensorRT: the timing cache {path} does not fit this TensorRT and GPU; starting a fresh one")
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, False):
        print("TensorRT: building without a timing cache")


def _save_timing_cache(config: Any, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:  # none attached (see _attach_timing_cache)
        return
    try:
        write_bytes_atomic(path, bytes(cache.serialize()))
    except OSError as exc:
        print(f"TensorRT: could not save the timing cache {path} ({exc})")


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


def _engine_device(index: int) -> torch.device:
    """Where an engine's tensors live (the tests of this module run engines of a stand-in TensorRT on the CPU)."""
    return torch.device("cuda", index)


def _aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor whose data starts on an :data:`ALIGNMENT` boundary.

    CUDA's caching allocator hands out 512-byte aligned blocks, so the slack is rarely needed there; it makes the
    alignment hold on any allocator.
    """
    n = math.prod(shape)
    buf = torch.empty(n + ALIGNMENT // dtype.itemsize, dtype=dtype, device=device)
    start = (-buf.data_ptr() % ALIGNMENT) // dtype.itemsize
    return buf[start : start + n].view(shape)


class EngineRunner:
    """Runs a serialised TensorRT engine with one input and one output on a CUDA device, on its own stream.

    ``run(x)`` takes a (B, ...) array or tensor of any batch size (split into chunks of at most the profile's
    max batch) and returns float32 logits as a numpy array; ``run_torch(x)`` keeps a CUDA tensor on the device.
    Work is queued on the runner's stream after the caller's current stream, and the caller's stream waits for it:
    the result is ready for whatever the caller queues next, with no host synchronisation (``enqueueV3`` on the
    default stream would add some).

    Args:
        engine_path: The engine file.
        device: CUDA device index (default: the current device).
        check: Compare the sidecar's TensorRT version and GPU with this machine first (default True).

    Raises:
        InputError: The engine is missing, built elsewhere (see :func:`check_engine_compatible`), cannot be loaded
            by this TensorRT, or does not have one input and one output.
    """

    def __init__(self, engine_path: str | os.PathLike, *, device: int | None = None, check: bool = True):
        trt = require_tensorrt("Running a TensorRT engine")
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise InputError(f"TensorRT engine not found: {self.path}")
        index = torch.cuda.current_device() if device is None else int(device)
        self.device = _engine_device(index)
        self.info = check_engine_compatible(self.path, trt, index) if check else {}
        self._logger = _logger(trt)
        mark = self._logger.mark()
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                detail = self._logger.errors_since(mark)
                raise InputError(f"TensorRT {trt.__version__} cannot load the engine {self.path} ({detail})")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        self._describe_io(trt)

    def _describe_io(self, trt: ModuleType) -> None:
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
            caller = torch.cuda.current_stream(self.device)
            inp = x.to(self.device, self.input_dtype)
            if not inp.is_contiguous() or inp.data_ptr() % ALIGNMENT:
                # A chunk of a batch already on the device starts anywhere (one FusionNet site is 73,500 bytes).
                inp = _aligned_empty(tuple(inp.shape), inp.dtype, self.device).copy_(inp)
            mark = self._logger.mark()
            if not self.context.set_input_shape(self.input_name, tuple(inp.shape)):
                raise InputError(
                    f"{self.path} does not accept input shape {tuple(inp.shape)} (profile batch "
                    f"{self.min_batch}..{self.max_batch}, shape {self.input_shape})"
                )
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            out = _aligned_empty(out_shape, self.output_dtype, self.device)
            self._bind(self.input_name, inp, mark)
            self._bind(self.output_name, out, mark)
            self.stream.wait_stream(caller)  # the input (and anything else queued before) is ready first
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise FusionkernError(f"TensorRT failed to run {self.path} ({self._logger.errors_since(mark)})")
            caller.wait_stream(self.stream)
            for t in (inp, out):  # the allocator must not reuse them before the engine is done with them
                t.record_stream(self.stream)
        return out

    def _bind(self, name: str, tensor: torch.Tensor, mark: int) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise FusionkernError(
                f"TensorRT refused the address of {name} for {self.path} ({self._logger.errors_since(mark)})"
            )
