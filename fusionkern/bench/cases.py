"""The benchmark cases: what is built, on which shapes, and what one timed call does.

The suite in the repository's ``benchmarks/`` folder parametrises over these definitions; every timed callable
lives here so that it can be read (and reused) apart from pytest.

Four families, each compared inside its pytest-benchmark group against a baseline from the same run:

* ``layers``: the Gabor conv + ReLU + mixed pooling stage, the conv + mixed pooling stage, the dilated block and
  channel attention, at a preset's shapes; ``eager`` (the reference, baseline), ``compile`` (``torch.compile`` of
  the reference) and ``triton`` (the same module switched onto the kernels; CUDA only); passes ``fwd``
  (inference forward, eval mode), ``bwd`` (the backward alone, train mode) and ``full`` (forward + backward);
  fp32 and bf16. Plus ``gabor_bank``: the vectorised bank against a per-filter double loop (baseline).
* ``model``: FusionNet sites/s per backend and precision over batch sizes (baseline ``eager-fp32``), and
  ``train``: one training step (forward, weighted cross-entropy, backward, Adam) per backend, with peak memory.
* ``scan``: end-to-end chips/s on a generated raster, uncompressed and DEFLATE-compressed, against the scan's input
  side alone, plain rasterio reads of the same windows (:mod:`fusionkern.bench.rawread`) and inference alone
  (baseline).
* ``roofline``: matmul peak and copy bandwidth in the same run, and FLOPs and bytes per site per preset
  (:mod:`fusionkern.bench.roofline`).

Shapes and batch sizes come from a :class:`Plan`: tiny ones in quick mode, small ones on a CPU, the issue's batch
64-256 on a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import itertools
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionkern.models import (
    ChannelAttention,
    ConvStage,
    DilatedAvgBlock,
    FusionNet,
    GaborConv2d,
    MixPool2d,
    get_preset,
)
from fusionkern.errors import ConfigError
from fusionkern.models.layers import LEGACY_SIGMA_EPS

PRESETS = ("paper", "native")
LAYERS = ("gabor_stage", "conv_stage", "dilated_block", "attention")
PASSES = ("fwd", "bwd", "full")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYER_DTYPES = ("fp32", "bf16")
LAYER_VARIANTS = ("eager", "compile", "triton")
MODEL_VARIANTS = (
    "eager-fp32", "eager-bf16", "compile-fp32", "compile-bf16", "triton-fp32", "triton-bf16", "triton-fp32-nhwc",
    "triton-bf16-nhwc", "onnxruntime-fp32", "tensorrt-fp16",
)  # fmt: skip
"""``backend-precision[-layout]``: ``-nhwc`` runs the kernels on channels-last activations
(``to_backend("triton", channels_last=True)``)."""
TRAIN_VARIANTS = ("eager", "compile", "triton")
SCAN_VARIANTS = ("inference", "io", "raw_read", "end_to_end")
SCAN_COMPRESSIONS = ("uncompressed", "deflate")

BASELINES = {
    "layers": "eager",
    "gabor_bank": "loop",
    "model": "eager-fp32",
    "train": "eager",
    "scan": "inference",
    "matmul": "fp32",
    "copy": "copy",
    "costs": "costs",
}
"""The baseline variant of each case family: every other variant of a group is reported as a ratio to it."""

CLASS_WEIGHTS = (3.0, 1.0)  # the paper's weighted cross-entropy (cement, landcover)


# --------------------------------------------------------------------------------------------------------------
# Plans: shapes and sizes per device and mode
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run.

    Attributes:
        device: ``cpu`` or ``cuda``.
        quick: Tiny shapes, one call per case.
        layer_presets: Presets whose layer shapes are timed.
        layer_batch: Batch of the layer cases per preset.
        layer_channel_div: Divides every layer's channel counts (quick mode only).
        layer_max_size: Caps every layer's spatial side (quick mode only).
        model_width: FusionNet width multiplier of the model, train and scan cases.
        model_batches: Batch sizes of the throughput case per preset.
        train_batch: Batch of the training step per preset (its keys are the presets timed).
        scan_presets: Presets scanned.
        scan_size_px: Side of the generated region, in pixels.
        scan_batch: Chips per predictor call in the scan.
        matmul_n: Side of the square matrices of the matmul peak.
        copy_mib: Size of the buffer copied for the bandwidth, in MiB.
        cost_presets: Presets whose FLOPs and bytes per site are counted.
        cost_batch: Batch at which bytes per site are stated (weights are read once per batch).
        compile_backend: ``torch.compile`` backend (``eager`` in quick mode: Dynamo captures the graph, which checks
            that the compiled path runs, without paying for Inductor's code generation).
        target_s: Seconds spent timing each case.
        threads: CPU threads of torch and onnxruntime (None: their defaults).
    """

    device: str
    quick: bool
    layer_batch: Mapping[str, int]
    layer_presets: tuple[str, ...] = ("paper", "native")
    layer_channel_div: int = 1
    layer_max_size: int | None = None
    model_width: float = 1.0
    model_batches: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    train_batch: Mapping[str, int] = field(default_factory=dict)
    scan_presets: tuple[str, ...] = ("native",)
    scan_size_px: int = 1024
    scan_batch: int = 256
    matmul_n: int = 1024
    copy_mib: int = 256
    cost_presets: tuple[str, ...] = ("paper", "native")
    cost_batch: int = 256
    compile_backend: str = "inductor"
    target_s: float = 1.0
    threads: int | None = None


def make_plan(
    device: str,
    quick: bool = False,
    target_s: float | None = None,
    threads: int | None = None,
    width: float | None = None,
    scan_px: int | None = None,
) -> Plan:
    """The sizes of a run on ``device`` (``cpu`` or ``cuda``), tiny in quick mode; ``width`` and ``scan_px``
    replace the model width and the scan region's side (e.g. to time the model a user scans with, for
    ``fusionkern scan --plan``)."""
    if quick:
        # Every code path once, on the native preset only: the paper preset differs in sizes, not in code.
        plan = Plan(
            device=device, quick=True, layer_batch={"native": 2}, layer_presets=("native",), layer_channel_div=8,
            layer_max_size=16, model_width=0.125, model_batches={"native": (2,)}, train_batch={"native": 2},
            scan_presets=("native",), scan_size_px=128, scan_batch=64, matmul_n=128, copy_mib=4,
            cost_presets=("native",), cost_batch=256, compile_backend="eager", target_s=0.0,
        )  # fmt: skip
    elif device == "cuda":
        plan = Plan(
            device=device, quick=False, layer_batch={"paper": 64, "native": 256}, model_width=1.0,
            model_batches={"paper": (16, 64, 256), "native": (64, 256, 1024)}, train_batch={"paper": 64, "native": 256},
            scan_presets=("native", "paper"), scan_size_px=2048, scan_batch=256, matmul_n=8192, copy_mib=1024,
            target_s=1.0,
        )  # fmt: skip
    else:
        plan = Plan(
            device=device, quick=False, layer_batch={"paper": 4, "native": 64}, model_width=1.0,
            model_batches={"paper": (1, 4), "native": (1, 16, 64)}, train_batch={"paper": 2, "native": 32},
            scan_presets=("native",), scan_size_px=256, scan_batch=64, matmul_n=2048, copy_mib=256, target_s=1.0,
        )  # fmt: skip
    if target_s is not None and not quick:
        plan = dataclasses.replace(plan, target_s=float(target_s))
    if threads:
        plan = dataclasses.replace(plan, threads=int(threads))
    if width is not None:
        if not width > 0:
            raise ConfigError(f"the bench model width must be positive, got {width}")
        plan = dataclasses.replace(plan, model_width=float(width))
    if scan_px is not None:
        if scan_px < 64:
            raise ConfigError(f"the bench scan region needs at least 64 px a side, got {scan_px}")
        plan = dataclasses.replace(plan, scan_size_px=int(scan_px))
    return plan


# --------------------------------------------------------------------------------------------------------------
# What this machine can run
# --------------------------------------------------------------------------------------------------------------


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def variant_unavailable(variant: str, device: str, plan: Plan | None = None) -> str | None:
    """Why ``variant`` (a layer, model, train or scan backend name) cannot run here, or None when it can."""
    backend, _, precision = variant.partition("-")
    precision = precision.partition("-")[0]  # a layout may follow
    if backend == "triton":
        if device != "cuda":
            return "the Triton kernels run on a CUDA GPU (Triton's CPU interpreter is for tests, not timings)"
        if not _has_module("triton"):
            return "triton is not installed (pip install 'fusionkern[kernels]')"
    if backend == "compile" and device == "cpu" and (plan is None or plan.compile_backend == "inductor"):
        if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
            return "torch.compile on the CPU needs a C++ compiler, and none is on PATH"
    if backend == "onnxruntime":
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if not _has_module(m)]
        if missing:
            return f"{', '.join(missing)} not installed (pip install 'fusionkern[export]')"
        if device == "cuda" and not _onnxruntime_has_cuda():
            return ("this onnxruntime has no CUDA provider (onnxruntime-gpu not installed): its figures come from a "
                    "CPU run")  # fmt: skip
    if backend == "tensorrt":
        if device != "cuda":
            return "TensorRT engines run on a CUDA GPU"
        if not _has_module("tensorrt"):
            return "tensorrt is not installed (pip install 'fusionkern[trt]')"
        missing = [m for m in ("onnx", "onnxscript") if not _has_module(m)]
        if missing:
            return f"{', '.join(missing)} not installed (pip install 'fusionkern[export]'), needed to build engines"
    if backend in ("eager", "compile") and precision == "bf16" and device == "cpu" and not cpu_has_native_bf16():
        if plan is not None and not plan.quick:
            return "this CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 would be emulated, not representative"
    return None


def quick_skip(family: str, variant: str, dtype: str = "fp32", plan: Plan | None = None) -> str | None:
    """Why quick mode leaves a case out, or None. Quick mode checks every code path once, and Dynamo's tracing
    dominates its time: the compiled path runs for the layers in fp32 and for the model's inference in fp32."""
    if plan is None or not plan.quick or not variant.startswith("compile"):
        return None
    if family == "layers" and dtype != "fp32":
        return "quick mode: the compiled layers run in fp32 only"
    if family == "model" and variant != "compile-fp32":
        return "quick mode: the compiled model runs in fp32 only"
    if family == "train":
        return "quick mode: the compiled model is checked by the inference case"
    return None


def scan_unavailable() -> str | None:
    """Why the scan case cannot run here, or None."""
    try:
        from fusionkern.scan import engine
    except ImportError as exc:
        return f"the scanner cannot be imported ({exc})"
    missing = [name for name in ("make_benchmark_region", "time_io", "time_end_to_end") if not hasattr(engine, name)]
    if missing:
        return f"the scan engine has no timing helpers {missing}"
    if not _has_module("rasterio"):
        return "rasterio is not installed (pip install 'fusionkern[geo]'), needed to write the generated raster"
    return None


def set_tf32(enabled: bool) -> None:
    """Allow or forbid TF32 in cuBLAS and cuDNN alike (an all-IEEE or all-TF32 run; the suite uses
    :func:`use_torch_fp32_defaults`)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def use_torch_fp32_defaults() -> None:
    """PyTorch's own fp32 defaults: TF32 convolutions in cuDNN, IEEE matrix products in cuBLAS.

    The eager baseline is what users run, and PyTorch runs fp32 convolutions on the TF32 tensor cores unless told
    otherwise; the fused kernels follow the same switch (their ``allow_tf32=None`` default), so every fp32 variant
    computes at the precision a user of that variant gets.
    """
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False


def fp32_settings() -> str:
    """What fp32 means in this process, for reports: the convolution and matmul precision in use."""
    from fusionkern.kernels._common import torch_conv_allows_tf32

    conv = "TF32" if torch_conv_allows_tf32() else "IEEE"
    matmul = "TF32" if torch.backends.cuda.matmul.allow_tf32 else "IEEE"
    return f"convolutions {conv} (cuDNN and the fused kernels), matmuls {matmul}"


def reset_compiler() -> None:
    """Forget every ``torch.compile`` graph, so that a case neither hits the recompile limit nor inherits dynamic
    shapes from an earlier case with another batch size."""
    torch._dynamo.reset()


def compile_module(module: nn.Module, plan: Plan) -> nn.Module:
    """``torch.compile`` of ``module`` with the plan's backend, after :func:`reset_compiler`."""
    reset_compiler()
    return torch.compile(module, backend=plan.compile_backend)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (inf for non-finite outputs)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


CHECK_TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 1e-1, "fp16": 1e-1}
"""Largest relative error of a variant's output against the eager reference before it is timed (a sanity check
that the timed code computes the same function; the parity tests in ``tests/`` hold the real tolerances). ``tf32``
applies to fp32 variants on a GPU where convolutions may use TF32 (two TF32 computations in different orders)."""


def check_tolerance(dtype_name: str, device: torch.device) -> float:
    """The :data:`CHECK_TOLERANCE` of a variant of ``dtype_name`` on ``device`` under the current TF32 setting."""
    if dtype_name == "fp32" and device.type == "cuda":
        from fusionkern.kernels._common import torch_conv_allows_tf32

        if torch_conv_allows_tf32():
            return CHECK_TOLERANCE["tf32"]
    return CHECK_TOLERANCE[dtype_name]


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """Input and output shape of one layer case: ``(batch, c_in, size, size) -> c_out`` channels."""

    batch: int
    c_in: int
    c_out: int
    size: int
    dilations: tuple[int, ...] = ()

    def describe(self) -> str:
        text = f"{self.batch}x{self.c_in}x{self.size}x{self.size}->{self.c_out}"
        return text + (f" d={','.join(map(str, self.dilations))}" if self.dilations else "")


def _map_sizes(preset_name: str) -> tuple[int, int, int]:
    """Input side of the first stage, the second stage and the dilated block (after every branch pool)."""
    preset = get_preset(preset_name)
    sizes = [preset.input_size]
    for pool in preset.pools:
        sizes.append(sizes[-1] // 2 if pool else sizes[-1])
    return sizes[0], sizes[1], sizes[-1]


def layer_shape(layer: str, preset_name: str, plan: Plan) -> LayerShape:
    """The shape of ``layer`` inside a FusionNet branch at ``preset_name`` (scaled down in quick mode)."""
    preset = get_preset(preset_name)
    s0, s1, s_last = _map_sizes(preset_name)
    widths = preset.widths
    if layer == "gabor_stage":
        shape = LayerShape(0, 3, widths[0], s0)
    elif layer == "conv_stage":
        shape = LayerShape(0, widths[0], widths[1], s1)
    elif layer == "dilated_block":
        shape = LayerShape(0, widths[-1], widths[-1], s_last, preset.dilations)
    elif layer == "attention":
        c = 5 * widths[-1]
        shape = LayerShape(0, c, c, s_last)
    else:
        raise ValueError(f"unknown layer {layer!r}; choose one of {LAYERS}")
    batch = plan.layer_batch[preset_name]
    div, cap = plan.layer_channel_div, plan.layer_max_size
    c_in = shape.c_in if layer == "gabor_stage" else max(4, shape.c_in // div)
    c_out = max(4, shape.c_out // div)
    if layer == "attention":
        c_out = c_in
    size = min(shape.size, cap) if cap else shape.size
    return LayerShape(batch, c_in, c_out, size, shape.dilations)


def build_layer(layer: str, shape: LayerShape, seed: int = 0) -> nn.Module:
    """The reference module of ``layer`` with deterministic weights (the same for every variant)."""
    torch.manual_seed(seed)
    if layer == "gabor_stage":  # DGCNN's first stage: Gabor conv -> ReLU -> MixPool (alpha 1) -> BN
        return ConvStage(
            GaborConv2d(shape.c_in, shape.c_out, 3, padding=1), MixPool2d(2, 2, 1.0), nn.BatchNorm2d(shape.c_out),
            "pool_bn",
        )  # fmt: skip
    if layer == "conv_stage":  # DGCNN's second stage: conv -> ReLU -> MixPool (alpha 0.8) -> BN
        return ConvStage(
            nn.Conv2d(shape.c_in, shape.c_out, 3, padding=1), MixPool2d(2, 2, 0.8), nn.BatchNorm2d(shape.c_out),
            "pool_bn",
        )  # fmt: skip
    if layer == "dilated_block":
        return DilatedAvgBlock(shape.c_in, shape.dilations, shape.c_out)
    if layer == "attention":
        return ChannelAttention(shape.c_in, 2)
    raise ValueError(f"unknown layer {layer!r}; choose one of {LAYERS}")


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Run every stage, dilated block and attention layer inside ``module`` on ``backend`` (same weights)."""
    if backend == "triton":
        from fusionkern.models.networks import check_backend_available

        check_backend_available("triton", next(module.parameters()).device)
    for m in module.modules():
        if isinstance(m, (ConvStage, DilatedAvgBlock, ChannelAttention)):
            m.backend = backend
    return module


def input_sets(make: Callable[[int], torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Inputs to rotate through: on a GPU, enough sets that together they overflow the L2 cache twice (at most
    8), so that repeated calls do not time a cache-resident input; one set on the CPU."""
    first = make(0)
    if device.type != "cuda":
        return [first]
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    n = max(1, min(8, math.ceil(2 * l2 / max(1, first.nbytes))))
    return [first] + [make(i) for i in range(1, n)]


@dataclass
class TimedCall:
    """One case, ready to time: ``fn()`` (or ``fn(*setup())``), with what it processes per call."""

    fn: Callable[..., Any]
    setup: Callable[[], tuple] | None = None
    repeatable: bool = True
    items: int = 1
    info: dict[str, Any] = field(default_factory=dict)


def layer_call(
    layer: str, pass_: str, dtype_name: str, preset: str, variant: str, plan: Plan, device: torch.device
) -> TimedCall:
    """The timed call of one layer case, after checking its forward against the eager reference.

    ``fwd`` runs the module in eval mode without autograd (BatchNorm folds into the kernels' epilogue on the
    Triton path); ``bwd`` times ``torch.autograd.grad`` of a forward done in the untimed setup; ``full`` times both.
    The first layer's input needs no gradient (it is the image), every other layer's does.
    """
    dtype = DTYPES[dtype_name]
    shape = layer_shape(layer, preset, plan)
    module = build_layer(layer, shape).to(device=device, dtype=dtype)
    if variant == "triton":
        set_backend(module, "triton")
    runner = compile_module(module, plan) if variant == "compile" else module
    needs_input_grad = layer != "gabor_stage"

    def make_input(i: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(1000 + i)
        x = torch.randn(shape.batch, shape.c_in, shape.size, shape.size, generator=g)
        return x.to(device=device, dtype=dtype)

    inputs = input_sets(make_input, device)
    info = {"shape": shape.describe(), "input_sets": len(inputs)}

    # Same function as the reference before anything is timed (checked once, in the forward case).
    if variant != "eager" and pass_ == "fwd":
        reference = build_layer(layer, shape).to(device=device, dtype=dtype).eval()
        module.eval()
        with torch.no_grad():
            ref, out = reference(inputs[0]), runner(inputs[0])
        err, tol = relative_error(out, ref), check_tolerance(dtype_name, device)
        if not err <= tol:
            raise AssertionError(
                f"{layer} {variant} {dtype_name} {preset}: output differs from the eager reference "
                f"(relative error {err:.2e} > {tol:.0e}); refusing to time it"
            )
        info["check_rel_err"] = err
    cycle = itertools.cycle(inputs)

    if pass_ == "fwd":
        module.eval()

        def fwd():
            with torch.no_grad():
                return runner(next(cycle))

        return TimedCall(fwd, items=shape.batch, info=info)

    module.train()
    leaves_params = [p for p in module.parameters() if p.requires_grad]
    train_inputs = [x.requires_grad_(needs_input_grad) for x in inputs]
    cycle = itertools.cycle(train_inputs)
    with torch.no_grad():
        out_shape = runner(train_inputs[0]).shape
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(7)).to(device=device, dtype=dtype)

    def leaves(x: torch.Tensor) -> list[torch.Tensor]:
        return ([x] if needs_input_grad else []) + leaves_params

    if pass_ == "full":

        def full():
            x = next(cycle)
            return torch.autograd.grad(runner(x), leaves(x), grad_out)

        return TimedCall(full, items=shape.batch, info=info)

    if pass_ == "bwd":

        def forward():
            x = next(cycle)
            return runner(x), x

        def backward(out, x):
            return torch.autograd.grad(out, leaves(x), grad_out)

        return TimedCall(backward, setup=forward, repeatable=False, items=shape.batch, info=info)
    raise ValueError(f"unknown pass {pass_!r}; choose one of {PASSES}")


# --------------------------------------------------------------------------------------------------------------
# Gabor bank: vectorised against the authors' per-filter loop
# --------------------------------------------------------------------------------------------------------------


def gabor_bank_loop(
    freq: torch.Tensor, theta: torch.Tensor, sigma: torch.Tensor, psi: torch.Tensor, kernel_size: int
) -> torch.Tensor:
    """The legacy Gabor bank built one filter at a time in a Python double loop, as the authors' code builds it.

    Same values as ``gabor_bank(..., grid="legacy")``: the grid ``linspace(-ceil(k/2)+1, ceil(k/2), k)`` laid out
    with ``meshgrid(indexing="ij")``, ``sigma + 1e-3`` in the exponent, ``1 / (2 pi sigma^2)`` normalisation.
    """
    half = math.ceil(kernel_size / 2)
    lin = torch.linspace(-half + 1, half, kernel_size, dtype=freq.dtype, device=freq.device)
    x, y = torch.meshgrid(lin, lin, indexing="ij")
    rows = []
    for o in range(freq.shape[0]):
        filters = []
        for i in range(freq.shape[1]):
            f, t, s, p = freq[o, i], theta[o, i], sigma[o, i], psi[o, i]
            xr = x * torch.cos(t) + y * torch.sin(t)
            yr = -x * torch.sin(t) + y * torch.cos(t)
            g = torch.exp(-(xr**2 + yr**2) / (2 * (s + LEGACY_SIGMA_EPS) ** 2)) * torch.cos(f * xr + p)
            filters.append(g / (2 * math.pi * s**2))
        rows.append(torch.stack(filters))
    return torch.stack(rows)


def gabor_bank_call(pass_: str, variant: str, plan: Plan, device: torch.device) -> TimedCall:
    """The first Gabor layer's bank (``widths[0] x 3 x 3 x 3``) built by ``variant`` (``loop`` or ``vectorised``);
    ``fwd`` builds it, ``full`` builds it and back-propagates to the four parameter tensors."""
    from fusionkern.models import gabor_bank

    c_out = max(4, get_preset("paper").widths[0] // plan.layer_channel_div)
    conv = GaborConv2d(3, c_out, 3, padding=1, grid="legacy").to(device)
    params = [conv.freq, conv.theta, conv.sigma, conv.psi]

    def build():
        if variant == "loop":
            return gabor_bank_loop(*params, 3)
        if variant == "vectorised":
            return gabor_bank(*params, 3, "legacy")
        raise ValueError(f"unknown gabor bank variant {variant!r}")

    with torch.no_grad():
        err = relative_error(gabor_bank_loop(*params, 3), gabor_bank(*params, 3, "legacy"))
    if not err <= 1e-5:
        raise AssertionError(f"the per-filter loop bank differs from gabor_bank (relative error {err:.2e})")
    info = {"shape": f"{c_out}x3x3x3", "check_rel_err": err}
    weight = torch.randn(c_out, 3, 3, 3, generator=torch.Generator().manual_seed(3)).to(device)

    if pass_ == "fwd":

        def fwd():
            with torch.no_grad():
                return build()

        return TimedCall(fwd, items=c_out * 3, info=info)
    if pass_ == "full":

        def full():
            return torch.autograd.grad((build() * weight).sum(), params)

        return TimedCall(full, items=c_out * 3, info=info)
    raise ValueError(f"the gabor bank case has passes fwd and full, got {pass_!r}")


# --------------------------------------------------------------------------------------------------------------
# The model: throughput per backend, training step
# --------------------------------------------------------------------------------------------------------------


def build_fusionnet(preset: str, width: float, seed: int = 0) -> FusionNet:
    """A FusionNet in eval mode with deterministic random weights."""
    torch.manual_seed(seed)
    return FusionNet(preset, width=width).eval()


@functools.lru_cache(maxsize=None)
def model_flops(preset: str, width: float, effective: bool = True) -> float:
    """FLOPs of one site's forward pass (:func:`fusionkern.models.profile.flops_per_site`: convolutions and linear
    layers): effective (only multiply-adds whose input tap lies inside the input map, what the roofline's share of
    peak uses) or nominal (zero padding's taps too)."""
    from fusionkern.models.profile import flops_per_site

    return float(flops_per_site(build_fusionnet(preset, width), effective=effective))


def flops_fields(preset: str, width: float, passes: int = 1) -> dict[str, float]:
    """``flops_per_item`` (effective) and ``flops_per_item_nominal`` of a model or training row, for its
    ``extra_info``; ``passes`` forward passes per site (a training step counts three)."""
    return {"flops_per_item": passes * model_flops(preset, width),
            "flops_per_item_nominal": passes * model_flops(preset, width, effective=False)}  # fmt: skip


def site_inputs(model: FusionNet, batch: int, seed: int = 0) -> torch.Tensor:
    """Random sites (B, 5, 3, S, S) in [0, 1] at the model's input size (already resized), float32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 5, 3, model.input_size, model.input_size, generator=g)


class Artefacts:
    """Exported ONNX files and TensorRT engines of the run, built once per model and precision."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._onnx: dict[tuple, Path] = {}
        self._engines: dict[tuple, Path] = {}

    def onnx(self, model: FusionNet, key: str, precision: str, max_batch: int) -> Path:
        from fusionkern.export import to_onnx

        k = (key, precision)
        if k not in self._onnx:
            self._onnx[k] = to_onnx(model, self.folder / f"{key}-{precision}.onnx", precision=precision,
                                    max_batch=max(2, max_batch))  # fmt: skip
        return self._onnx[k]

    def engine(self, model: FusionNet, key: str, precision: str, max_batch: int) -> Path:
        from fusionkern.export import build_engine

        k = (key, precision, max_batch)
        if k not in self._engines:
            onnx_path = self.onnx(model, key, precision, max_batch)
            path = self.folder / f"{key}-{precision}-b{max_batch}.engine"
            self._engines[k] = build_engine(onnx_path, path, precision=precision, min_batch=1, opt_batch=max_batch,
                                            max_batch=max_batch)  # fmt: skip
        return self._engines[k]


def onnx_providers(device: torch.device) -> list[str]:
    """onnxruntime's CUDA provider on a GPU run where this onnxruntime build has it, else the CPU provider."""
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def model_call(
    preset: str, batch: int, variant: str, plan: Plan, device: torch.device, artefacts: Artefacts
) -> TimedCall:
    """FusionNet inference on one batch of sites by ``variant`` (``backend-precision``), after checking its logits
    against eager fp32 on the same sites (fp32 variants; 16-bit ones must be finite)."""
    backend, _, precision = variant.partition("-")
    precision, _, layout = precision.partition("-")
    base = build_fusionnet(preset, plan.model_width)
    x_cpu = site_inputs(base, batch)
    key = f"fusionnet-{preset}-w{plan.model_width:g}"
    max_batch = max(plan.model_batches[preset])
    info: dict[str, Any] = {"backend": backend, "precision": precision, "layout": layout or "nchw"}

    with torch.no_grad():
        ref = copy.deepcopy(base).to(device)(x_cpu.to(device)).float().cpu()

    if backend in ("eager", "compile", "triton"):
        dtype = DTYPES[precision]
        model = copy.deepcopy(base).to(device=device, dtype=dtype).eval()
        if backend == "triton":
            model.to_backend("triton", channels_last=layout == "nhwc")
        runner = compile_module(model, plan) if backend == "compile" else model
        x = x_cpu.to(device=device, dtype=dtype)

        def run():
            # no_grad rather than inference_mode: tensors a layer caches during an inference-mode call could
            # not be saved for backward by a later training step in the same process.
            with torch.no_grad():
                return runner(x)

        info["compile_backend"] = plan.compile_backend if backend == "compile" else None
    elif backend == "onnxruntime":
        from fusionkern.export import onnx_session

        path = artefacts.onnx(base, key, precision, max_batch)
        providers = onnx_providers(device)
        session = onnx_session(path, providers=providers, threads=plan.threads)
        name = session.get_inputs()[0].name
        x_np = x_cpu.numpy()

        def run():
            return torch.from_numpy(session.run(None, {name: x_np})[0])

        info["providers"] = session.get_providers()
    elif backend == "tensorrt":
        from fusionkern.export import EngineRunner

        runner_trt = EngineRunner(artefacts.engine(base, key, precision, max_batch))
        x = x_cpu.to(device)

        def run():
            return runner_trt.run_torch(x)

    else:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {MODEL_VARIANTS}")

    out = run()
    err = relative_error(out.float().cpu(), ref)
    info["check_rel_err"] = err
    if precision == "fp32" and not err <= check_tolerance("fp32", device):
        raise AssertionError(f"{variant} logits differ from eager fp32 (relative error {err:.2e}); refusing to time it")
    if not math.isfinite(err):
        raise AssertionError(f"{variant} produced non-finite logits; refusing to time it")
    return TimedCall(run, items=batch, info=info)


def train_call(preset: str, variant: str, plan: Plan, device: torch.device) -> tuple[TimedCall, Callable[[], Any]]:
    """One fp32 training step (forward, weighted cross-entropy, backward, Adam step) of FusionNet by ``variant``.

    Returns:
        The timed call and the bare step (for the peak-memory measurement after timing).
    """
    batch = plan.train_batch[preset]
    model = build_fusionnet(preset, plan.model_width).to(device).train()
    if variant == "triton":
        model.to_backend("triton")
    runner = compile_module(model, plan) if variant == "compile" else model
    x = site_inputs(model, batch).to(device)
    y = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(5)).to(device)
    weight = torch.tensor(CLASS_WEIGHTS, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(runner(x), y, weight=weight)
        loss.backward()
        optimizer.step()
        return loss

    info = {"batch": batch, "optimizer": "Adam",
            "compile_backend": plan.compile_backend if variant == "compile" else None}  # fmt: skip
    return TimedCall(step, repeatable=False, items=batch, info=info), step


# --------------------------------------------------------------------------------------------------------------
# Scan
# --------------------------------------------------------------------------------------------------------------


def scan_predictor(backend: str, preset: str, plan: Plan, device: torch.device, cache_dir: Path) -> Any:
    """The scanner's predictor for ``backend`` over a random-weight FusionNet at the plan's width."""
    from fusionkern.scan.backends import OnnxPredictor, make_predictor

    model = build_fusionnet(preset, plan.model_width)
    cache = cache_dir / f"{preset}-{backend}"
    if backend == "onnxruntime":
        return OnnxPredictor(model, cache, threads=plan.threads)
    dev = device if backend in ("torch", "triton") else "cpu"
    return make_predictor(backend, model, dev, cache_dir=cache, batch_size=plan.scan_batch)


def scan_feed_parity(predictor: Any, chip_px: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Scores of one random tile window as the scan computes them with ``predictor`` (chips cut and scaled on its
    device, fixed-shape batches, CUDA graphs where it uses them) against the reference: the same weights on the
    CPU in float32, fed chips cut and scaled on the host by the training code's float64 scaling.

    Returns:
        ``{"feed_parity_chips", "feed_parity_max_abs"}`` (the largest difference of cement probability), or
        ``{"feed_parity": "n/a (...)"}`` for a predictor without a torch model or device feed.
    """
    import numpy as np

    from fusionkern.scan.backends import TorchPredictor
    from fusionkern.scan.feed import ChipFeed, score_tile, uses_feed
    from fusionkern.scan.grid import ChipLayout
    from fusionkern.scan.tiles import SCORED, window_batches

    if not (uses_feed(predictor) and isinstance(predictor, TorchPredictor)):
        return {"feed_parity": "n/a (no torch model fed on its device)"}
    stride = chip_px // 2
    rows, cols = 7, 9  # a last partial batch whenever batch_size does not divide 63
    rng = np.random.default_rng(seed)
    stack = np.empty((5, 3, (rows - 1) * stride + chip_px, (cols - 1) * stride + chip_px), np.float32)
    for branch, (base, spread) in enumerate(((290, 6), (288, 6), (0.2, 0.08), (0.25, 0.08), (1.0, 0.3))):
        stack[branch] = base + spread * rng.standard_normal(stack.shape[1:])
    layout = ChipLayout(chip_px, stride, rows, cols)
    reasons = np.full((rows, cols), SCORED, np.uint8)
    got, _, _ = score_tile(ChipFeed(layout, predictor.feed_device), predictor, stack, reasons, batch_size)
    reference = TorchPredictor(copy.deepcopy(predictor.model).float(), "cpu", scale_on_device=False)
    want = np.concatenate([reference(chips) for _, chips in window_batches(stack, reasons, layout, batch_size)])
    return {"feed_parity_chips": int(want.size),
            "feed_parity_max_abs": float(np.abs(got.ravel() - want).max())}  # fmt: skip


@functools.lru_cache(maxsize=None)
def _region_chips(manifest: Path, chip_m: float, options: Any, tile_px: int) -> int:
    """Chips scored in one pass over the region (one I/O pass, which also warms the page cache and GDAL)."""
    from fusionkern.scan.engine import time_io

    return int(time_io(manifest, chip_m, options, tile_px)["chips"])


def scan_region(folder: Path, compression: str, plan: Plan) -> Path:
    """Writes the plan's generated region into ``folder``, ``uncompressed`` or ``deflate``; returns its manifest."""
    from fusionkern.scan.engine import make_benchmark_region

    if compression not in SCAN_COMPRESSIONS:
        raise ValueError(f"unknown scan region compression {compression!r}; choose one of {SCAN_COMPRESSIONS}")
    return make_benchmark_region(folder, plan.scan_size_px, block_px=min(512, plan.scan_size_px),
                                 compress=None if compression == "uncompressed" else compression)  # fmt: skip


def scan_call(variant: str, manifest: Path, predictor: Any, chip_px: int, plan: Plan) -> TimedCall:
    """One pass over the generated region: the input side alone (``io``: reading, calibration, masks, cutting and
    scaling, the predictor replaced by zeros), raw reads (``raw_read``: the same tile windows read with plain
    rasterio, :func:`fusionkern.bench.rawread.time_raw_reads`), inference alone (the predictor on chips already
    in memory, one scan batch at a time, as many chips as the region has) or end to end (the local engine with its
    reader threads and the predictor)."""
    import numpy as np

    from fusionkern.bench.rawread import time_raw_reads
    from fusionkern.scan.engine import EngineOptions, time_end_to_end, time_io
    from fusionkern.scan.feed import uses_feed

    options = EngineOptions(batch_size=plan.scan_batch)
    chip_m = chip_px * 30.0
    tile_px = min(1024, plan.scan_size_px)
    chips = _region_chips(manifest, chip_m, options, tile_px)
    info = {"region_px": plan.scan_size_px, "scan_batch": plan.scan_batch, "chips": chips}
    if variant == "io":  # chips cut and scaled where this predictor has them cut: its device, or the host
        feed = str(predictor.feed_device) if uses_feed(predictor) else None
        return TimedCall(lambda: time_io(manifest, chip_m, options, tile_px, feed_device=feed), repeatable=False,
                         items=chips, info={**info, "cut_and_scaled_on": feed or "host"})  # fmt: skip
    if variant == "raw_read":
        raw_chips = int(time_raw_reads(manifest, chip_m, tile_px, workers=options.workers)["chips"])
        if raw_chips != chips:
            raise AssertionError(f"raw reads count {raw_chips} chips where the scan scores {chips}; refusing to time")
        return TimedCall(lambda: time_raw_reads(manifest, chip_m, tile_px, workers=options.workers),
                         repeatable=False, items=chips, info={**info, "workers": options.workers})  # fmt: skip
    if variant == "end_to_end":
        return TimedCall(lambda: time_end_to_end(manifest, predictor, chip_m, options, tile_px), repeatable=False,
                         items=chips, info=info)  # fmt: skip
    if variant == "inference":
        batch = np.random.default_rng(0).random((plan.scan_batch, 5, 3, chip_px, chip_px), dtype=np.float32)
        calls = max(1, -(-chips // plan.scan_batch))

        def infer():
            for _ in range(calls):
                predictor(batch)

        return TimedCall(infer, repeatable=False, items=calls * plan.scan_batch, info=info)
    raise ValueError(f"unknown scan variant {variant!r}; choose one of {SCAN_VARIANTS}")


def group_name(family: str, *parts: Any) -> str:
    """pytest-benchmark group of a case: what is compared, e.g. ``layers/conv_stage/fwd/fp32/paper``."""
    return "/".join([family, *map(str, parts)])


def record(benchmark: Any, family: str, group: str, variant: str, call: TimedCall | None = None, **fields: Any) -> None:
    """Name the group and write the case description into ``benchmark.extra_info`` (read by the report)."""
    benchmark.group = group
    info = {"case": family, "variant": variant, "baseline": BASELINES[family], "items": 1}
    if call is not None:
        info.update(items=call.items, **call.info)
    info.update(fields)
    benchmark.extra_info.update(info)


__all__: Sequence[str] = (
    "Artefacts", "BASELINES", "LAYERS", "LAYER_DTYPES", "LAYER_VARIANTS", "MODEL_VARIANTS", "PASSES", "PRESETS",
    "Plan", "SCAN_COMPRESSIONS", "SCAN_VARIANTS", "TRAIN_VARIANTS", "TimedCall", "build_fusionnet", "build_layer",
    "check_tolerance", "flops_fields", "fp32_settings", "gabor_bank_call", "gabor_bank_loop", "group_name",
    "layer_call", "layer_shape", "make_plan", "model_call", "model_flops", "quick_skip", "record", "scan_call",
    "scan_predictor", "scan_region", "scan_unavailable", "set_backend", "set_tf32", "train_call",
    "use_torch_fp32_defaults", "variant_unavailable",
)  # fmt: skip
