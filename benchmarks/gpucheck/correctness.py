"""Correctness on the card: every kernel and every config its launcher can pick, at FusionNet's real layer shapes.

The cases are the model's own modules: FusionNet of each preset is traced on the ``meta`` device (no memory, no
compute) and every distinct :class:`~fusionkern.models.networks.ConvStage`, dilated block and attention layer
becomes a :class:`ModuleCase` (the five branches share their shapes, so one of each). A :class:`Unit` is one
case with one launch configuration:

* Gabor and conv stages (autotuned kernels): each config of ``GPU_CONV_CONFIGS`` that the launcher's pruning keeps
  at the stage's channels, forced onto the forward and backward autotuners in turn;
* the dilated block: a batch for each tile choice its launcher makes (it widens the tiles for large batches);
* attention: the launcher's single choice per shape.

Each unit runs the stage on the kernels (``backend = "triton"``) against the reference module with the same
weights (BatchNorm statistics and affine randomised, so that the folded eval-mode epilogue is exercised), in
training mode (forward, then every gradient for one shared ``grad_output``) and in eval mode (forward), compared
three ways (:data:`TOLERANCES`):

* ``fp32-ieee``: the kernels as the model calls them against the reference with TF32 off;
* ``fp32-torch-defaults``: the same kernel output against the reference under torch's default switches (cuDNN may
  use TF32 for fp32 convolutions): what a user comparing with eager fp32 sees;
* ``bf16``: the module in bfloat16 against the fp32 reference on the same bf16-rounded weights and inputs.

The output is compared as max |error| / max |reference|, each gradient as ||error|| / ||reference|| (a max-pool
near-tie decided the other way moves one gradient entry: the norm keeps that from failing a correct kernel). A
comparison that fails is repeated with another seed; only a failure on both counts. An autotune config that fails
an ``fp32-ieee`` or ``bf16`` comparison is excluded from its autotuner in the later phases
(:func:`apply_exclusions`).

Units run in worker processes on the one GPU (:func:`supervise`): compiling the kernels is the slow part and is
spread over the CPU cores; a worker whose CUDA context breaks is replaced, and its unit is reported as failed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import re
import selectors
import subprocess
import sys
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

PRECISIONS = ("fp32-ieee", "fp32-torch-defaults", "bf16")
TOLERANCES = {  # (output: max |error| / max |reference|, each gradient: ||error|| / ||reference||)
    "fp32-ieee": (2e-4, 5e-3),
    "fp32-torch-defaults": (1e-2, 5e-2),  # the reference may run its convolutions in TF32
    "bf16": (3e-2, 3e-2),
}
EXCLUDING = ("fp32-ieee", "bf16")  # the comparisons whose failure excludes an autotune config
INTERPRETER_BF16 = ("bf16 is not compared on the Triton CPU interpreter: it multiplies bf16 tl.dot operands as raw "
                    "bits (the kernel tests skip it there too); on a GPU it is")
DEFAULT_BATCH = 8
# Below this fraction of the largest gradient's RMS a reference gradient counts as zero (a sum that cancels, e.g. a
# conv bias before a training BatchNorm) and is compared at that scale instead of its own.
ZERO_GRAD_FLOOR = 1e-3
# The forward and backward autotuners of each autotuned op, as (module of fusionkern.kernels, forward, backward).
AUTOTUNERS = {
    "gabor": ("gabor_conv", "_gabor_conv_fwd", "_gabor_conv_bwd"),
    "conv": ("conv_mixpool", "_conv_mixpool_fwd", "_conv_mixpool_bwd"),
}
_STICKY_CUDA = re.compile(r"illegal (memory )?address|unspecified launch failure|CUDA error|device-side assert", re.I)
RESULT = "@@RESULT "
READY = "@@READY"


# --------------------------------------------------------------------------------------------------------------
# Cases and units
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleCase:
    """One distinct layer of FusionNet at a preset: where it is, what it is, its input and output shapes."""

    preset: str
    width: float
    path: str  # e.g. "branches.b10.stages.0" (the first of the identical branches)
    kind: str  # gabor | conv | dilated | attention
    in_shape: tuple[int, int, int]  # (C, H, W)
    out_shape: tuple[int, int, int]
    kernel_size: int = 0  # the convolution's (gabor and conv)

    @property
    def label(self) -> str:
        where = re.sub(r"^branches\.[^.]+\.", "branch.", self.path)
        c, h, _ = self.in_shape
        return f"{self.preset} {where} {self.kind} {c}->{self.out_shape[0]} @{h}px"


@dataclass(frozen=True)
class Unit:
    """One case with one launch configuration, run at one batch size."""

    id: str
    case: ModuleCase
    batch: int
    config: str | None = None  # autotune config forced on the case's conv kernels
    pick: str | None = None  # the launcher's own tile choice at this batch (dilated, attention)
    layout: str = "nchw"  # "nhwc": the input channels-last (the plain convolutions reduce over channel runs)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "Unit":
        d = json.loads(text)
        case = d.pop("case")
        case = ModuleCase(**{**case, "in_shape": tuple(case["in_shape"]), "out_shape": tuple(case["out_shape"])})
        return Unit(case=case, **d)

    @property
    def launch(self) -> str:
        return self.config or self.pick or "-"


def _kind(module) -> str:
    from fusionkern.models import ChannelAttention, ConvStage, DilatedAvgBlock, GaborConv2d

    if isinstance(module, ConvStage):
        return "gabor" if isinstance(module.conv, GaborConv2d) else "conv"
    if isinstance(module, DilatedAvgBlock):
        return "dilated"
    if isinstance(module, ChannelAttention):
        return "attention"
    return ""


@functools.lru_cache(maxsize=None)
def _fusionnet(preset: str, width: float, device: str):
    """FusionNet with fixed random weights (``meta``: shapes only, nothing allocated)."""
    import torch

    from fusionkern.models import FusionNet

    torch.manual_seed(0)
    with torch.device(device):
        return FusionNet(preset, width=width).eval()


def module_cases(presets: Sequence[str] = ("paper", "native"), width: float = 1.0) -> list[ModuleCase]:
    """Every distinct stage, dilated block and attention layer of FusionNet at ``presets``, in model order."""
    import torch

    cases: list[ModuleCase] = []
    for preset in presets:
        model = _fusionnet(preset, width, "meta")
        seen: dict[str, tuple] = {}
        hooks = []
        for name, module in model.named_modules():
            if _kind(module):

                def hook(mod, inputs, output, name=name):
                    seen.setdefault(name, (tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))

                hooks.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                model(torch.empty(1, 5, 3, model.input_size, model.input_size, device="meta"))
        finally:
            for h in hooks:
                h.remove()
        distinct = set()
        for name, module in model.named_modules():
            if name not in seen:
                continue
            in_shape, out_shape = seen[name]
            key = (type(module).__name__, in_shape, out_shape, repr(module))
            if key in distinct:
                continue
            distinct.add(key)
            conv = getattr(module, "conv", None)
            k = conv.kernel_size if conv is not None else 0
            k = k[0] if isinstance(k, tuple) else int(k)
            cases.append(ModuleCase(preset, width, name, _kind(module), in_shape, out_shape, k))
    return cases


def config_label(config) -> str:
    """A ``triton.Config`` as ``P64-CO64-R32-w4-s3`` (its tile, warps and stages)."""
    kw = config.kwargs
    return f"P{kw['BLOCK_P']}-CO{kw['BLOCK_CO']}-R{kw['BLOCK_R']}-w{config.num_warps}-s{config.num_stages}"


def _kernel_names(kind: str) -> tuple[str, str]:
    """The forward and backward ``@triton.jit`` kernels' names of an autotuned op."""
    return AUTOTUNERS[kind][1] + "_kernel", AUTOTUNERS[kind][2] + "_kernel"


def gpu_conv_configs() -> list:
    """The GPU autotune lists of the conv kernels, with the running Triton's replacements (what the autotuners hold
    on a GPU with this Triton, whatever this process runs)."""
    from fusionkern.kernels._common import make_configs, release_configs

    configs: list[dict] = []
    for kind in AUTOTUNERS:
        for kernel in _kernel_names(kind):
            configs += [c for c in release_configs(kernel) if c not in configs]
    return make_configs(configs)


def pickable_configs(case: ModuleCase) -> list[str]:
    """Labels of the autotune configs the launchers' pruning keeps for the case's channels and kernel size, forward
    or backward, in fp32 (TF32 or IEEE) or bf16 (the running Triton's exceptions differ by kernel and dtype)."""
    import torch

    from fusionkern.kernels._common import make_configs, prune_block_configs, release_configs

    labels: list[str] = []
    for kernel in _kernel_names(case.kind):
        for dtype, precision in ((torch.float32, "tf32"), (torch.float32, "ieee"), (torch.bfloat16, "ieee")):
            args = {"x_ptr": torch.empty(0, dtype=dtype), "CI": case.in_shape[0], "CO": case.out_shape[0],
                    "K": case.kernel_size}  # fmt: skip
            kept = prune_block_configs(make_configs(release_configs(kernel)), args, kernel=kernel,
                                       DOT_PRECISION=precision)  # fmt: skip
            labels += [label for label in map(config_label, kept) if label not in labels]
    return labels


def dilated_pick(case: ModuleCase, batch: int) -> str:
    """The dilated block's tiles at ``batch`` on a GPU, fp32 and bf16 (the input gradient uses the same kernel)."""
    import torch

    from fusionkern.kernels import dilated

    c, h, w = case.in_shape
    m = batch * h * w
    gpu = torch.device("cuda")  # only its type is read: nothing touches a GPU here
    parts = [f"{name}:{'x'.join(map(str, dilated._conv_blocks(m, c, case.out_shape[0], dtype, gpu)[:3]))}"
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))]  # fmt: skip
    parts += [f"wgrad-{name}:{'x'.join(map(str, dilated._wgrad_blocks(m, c, case.out_shape[0], gpu, dtype, q)[:3]))}"
              for name, dtype, q in (("fp32", torch.float32, "tf32"), ("bf16", torch.bfloat16, "ieee"))]  # fmt: skip
    return " ".join(parts)


def attention_pick(case: ModuleCase) -> str:
    from fusionkern.kernels import attention

    c, h, w = case.in_shape
    return "C{}-HW{}-w{}".format(*attention._tiles(c, h * w))


def make_units(cases: Sequence[ModuleCase], batch: int = DEFAULT_BATCH, max_batch: int = 2048) -> list[Unit]:
    """The units of ``cases``, largest first (they take longest: started first, they finish in time); then every
    plain convolution's configs again on a channels-last input (its own reduction order), largest first too."""
    units: list[Unit] = []
    nhwc = [Unit(f"{case.label} nhwc [{label}]", case, batch, config=label, layout="nhwc")
            for case in cases if case.kind == "conv" for label in pickable_configs(case)]  # fmt: skip
    for case in cases:
        if case.kind in AUTOTUNERS:
            for label in pickable_configs(case):
                units.append(Unit(f"{case.label} [{label}]", case, batch, config=label))
        elif case.kind == "dilated":
            picks: dict[str, int] = {}
            b = batch
            while b <= max_batch:
                picks.setdefault(dilated_pick(case, b), b)
                b *= 2
            # The smallest power-of-two batch of each choice (the tiles widen once there are enough of them).
            for pick, b in picks.items():
                units.append(Unit(f"{case.label} b{b} [{pick}]", case, b, pick=pick))
        else:
            units.append(Unit(f"{case.label} [{attention_pick(case)}]", case, batch, pick=attention_pick(case)))
    def size(u: Unit) -> int:
        return -u.batch * math.prod(u.case.in_shape) * max(1, u.case.out_shape[0])

    return sorted(units, key=size) + sorted(nhwc, key=size)


# --------------------------------------------------------------------------------------------------------------
# Forcing and excluding autotune configs
# --------------------------------------------------------------------------------------------------------------


def _autotuner(kind: str, which: int):
    import importlib

    module, fwd, bwd = AUTOTUNERS[kind]
    return getattr(importlib.import_module(f"fusionkern.kernels.{module}"), fwd if which == 0 else bwd)


def autotuner_name(kind: str, which: int) -> str:
    module, fwd, bwd = AUTOTUNERS[kind]
    return f"{module}.{fwd if which == 0 else bwd}"


@contextlib.contextmanager
def forced_config(kind: str, label: str | None) -> Iterator[None]:
    """Make the forward and backward autotuners of ``kind`` run the one config ``label`` (restored after)."""
    if label is None or kind not in AUTOTUNERS:
        yield
        return
    config = next((c for c in gpu_conv_configs() if config_label(c) == label), None)
    if config is None:
        raise ValueError(f"no GPU autotune config {label!r}")
    tuners = [_autotuner(kind, 0), _autotuner(kind, 1)]
    saved = [(t.configs, dict(t.cache)) for t in tuners]
    try:
        for t in tuners:
            t.configs = [config]
            t.cache.clear()
        yield
    finally:
        for t, (configs, cache) in zip(tuners, saved):
            t.configs = configs
            t.cache.clear()
            t.cache.update(cache)


def exclusions_from(rows: Sequence[dict]) -> dict[str, list[str]]:
    """``{autotuner: [config labels]}`` that failed an excluding comparison (output: forward, gradients: backward)
    or raised (a config that does not compile or launch: both)."""
    out: dict[str, set[str]] = {}
    for row in rows:
        if not row.get("config") or row["kind"] not in AUTOTUNERS:
            continue
        if row.get("status") == "error":
            failed = ["output", "gradients"]
        elif row.get("status") == "fail" and row.get("precision") in EXCLUDING:
            failed = row.get("failed", [])
        else:
            continue
        if "output" in failed:
            out.setdefault(autotuner_name(row["kind"], 0), set()).add(row["config"])
        if any(f != "output" for f in failed):
            out.setdefault(autotuner_name(row["kind"], 1), set()).add(row["config"])
    return {k: sorted(v) for k, v in sorted(out.items())}


def apply_exclusions(exclusions: dict[str, list[str]]) -> list[str]:
    """Drop the excluded configs from the autotuners of this process; returns one line per autotuner touched.

    An autotuner whose every config failed is left as it is (the report already says the kernel is wrong).
    """
    import importlib

    lines = []
    for name, labels in exclusions.items():
        module, attr = name.rsplit(".", 1)
        tuner = getattr(importlib.import_module(f"fusionkern.kernels.{module}"), attr)
        keep = [c for c in tuner.configs if config_label(c) not in labels]
        if not keep:
            lines.append(f"{name}: every config failed; autotuning left unchanged")
            continue
        tuner.configs = keep
        tuner.cache.clear()
        lines.append(f"{name}: excluded {', '.join(labels)}; {len(keep)} configs left")
    return lines


# --------------------------------------------------------------------------------------------------------------
# Comparing one unit
# --------------------------------------------------------------------------------------------------------------


def scaled_max_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| in float64 (inf when ``actual`` is not finite)."""
    import torch

    a, e = actual.detach().double(), expected.detach().double()
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def gradient_errors(actual: Sequence, expected: Sequence) -> list[float]:
    """||a - e|| / ||e|| per gradient; a reference gradient below ``ZERO_GRAD_FLOOR`` of the largest RMS is
    compared at that floor instead (a cancelled sum is zero only up to rounding)."""
    import torch

    pairs = [(a.detach().double(), e.detach().double()) for a, e in zip(actual, expected)]
    rms = [float(e.norm() / math.sqrt(max(1, e.numel()))) for _, e in pairs]
    floor = ZERO_GRAD_FLOOR * max(rms, default=0.0)
    errors = []
    for a, e in pairs:
        if not torch.isfinite(a).all():
            errors.append(math.inf)
            continue
        scale = max(float(e.norm()), floor * math.sqrt(max(1, e.numel())), 1e-30)
        errors.append(float((a - e).norm()) / scale)
    return errors


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Reference convolutions and matmuls in true fp32 (TF32 off), restored after."""
    import torch

    from fusionkern.kernels._common import cudnn_fp32_precision

    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with cudnn_fp32_precision(False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _randomise_batchnorm(module, generator) -> None:
    """Running statistics and affine parameters away from their defaults, so that folding them is tested."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                    m.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def build_module(case: ModuleCase):
    """A fresh fp32 copy of the case's module from a seeded FusionNet, BatchNorm statistics randomised."""
    import torch

    module = copy.deepcopy(_fusionnet(case.preset, case.width, "cpu").get_submodule(case.path))
    _randomise_batchnorm(module, torch.Generator().manual_seed(11))
    return module


def _grad_names(module, with_input: bool) -> list[str]:
    return (["x"] if with_input else []) + [n for n, p in module.named_parameters() if p.requires_grad]


def compare(module, unit: Unit, dtype_name: str, mode: str, device, seed: int) -> list[dict]:
    """One unit at one dtype and mode against its references: one row per comparison (see :data:`PRECISIONS`)."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    g = torch.Generator().manual_seed(seed)
    c, h, w = unit.case.in_shape
    shape = (unit.batch, c, h, w)
    x = torch.rand(shape, generator=g) if unit.case.kind == "gabor" else torch.randn(shape, generator=g)
    if unit.layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)  # .to(device, dtype) below keeps the layout
    base = copy.deepcopy(module).to(dtype=dtype)
    kern = copy.deepcopy(base).to(device)
    kern.backend = "triton"
    train = mode == "train"
    with_input = unit.case.kind != "gabor"  # the first layer's input is the image: no gradient
    references = (
        {"fp32-ieee": ieee_fp32, "fp32-torch-defaults": contextlib.nullcontext} if dtype_name == "fp32"
        else {"bf16": ieee_fp32}
    )  # fmt: skip

    def run(net, inputs, grad_out):
        net.train(train)
        if not train:
            with torch.no_grad():
                return net(inputs), []
        inputs = inputs.detach().requires_grad_(with_input)
        leaves = ([inputs] if with_input else []) + [p for p in net.parameters() if p.requires_grad]
        out = net(inputs)
        return out, list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))

    x_k = x.to(device=device, dtype=dtype)
    out_shape = (unit.batch, *unit.case.out_shape)
    grad_out = torch.randn(out_shape, generator=g).to(device=device, dtype=dtype)
    y_k, grads_k = run(kern, x_k, grad_out)
    names = _grad_names(kern, with_input) if train else []
    rows = []
    for precision, context in references.items():
        ref = copy.deepcopy(base).to(device).float()
        ref.backend = "torch"
        with context():
            y_r, grads_r = run(ref, x_k.float(), grad_out.float())
        tol_out, tol_grad = TOLERANCES[precision]
        out_err = scaled_max_error(y_k.float(), y_r)
        grad_errs = gradient_errors([t.float() for t in grads_k], grads_r)
        failed = (["output"] if not out_err <= tol_out else []) + [
            n for n, e in zip(names, grad_errs) if not e <= tol_grad
        ]  # fmt: skip
        worst = max(zip(grad_errs, names), default=(0.0, ""))
        rows.append({
            "unit": unit.id, "module": unit.case.label, "preset": unit.case.preset, "kind": unit.case.kind,
            "config": unit.config, "pick": unit.pick, "batch": unit.batch, "precision": precision, "mode": mode,
            "out_err": out_err, "grad_err": worst[0] if names else None, "worst_grad": worst[1] or None,
            "tol_out": tol_out, "tol_grad": tol_grad if names else None,
            "status": "fail" if failed else "pass", "failed": failed, "seed": seed,
        })  # fmt: skip
    return rows


def run_unit(unit: Unit, device, retry: bool = True) -> list[dict]:
    """Every comparison of ``unit``: fp32 and bf16 (fp32 only on the interpreter, see :data:`INTERPRETER_BF16`),
    train and eval; a failing (dtype, mode) is rerun with another seed and fails only if it fails again."""
    from fusionkern.kernels._common import interpreting

    module = build_module(unit.case)
    rows: list[dict] = []
    with forced_config(unit.case.kind, unit.config):
        for dtype_name in ("fp32",) if interpreting() else ("fp32", "bf16"):
            for mode in ("train", "eval"):
                got = compare(module, unit, dtype_name, mode, device, seed=0)
                if retry and any(r["status"] == "fail" for r in got):
                    again = compare(module, unit, dtype_name, mode, device, seed=1)
                    for first, second in zip(got, again):
                        if first["status"] == "fail" and second["status"] == "pass":
                            second["note"] = f"seed 0 failed ({', '.join(first['failed'])}), seed 1 passed"
                    got = [second if first["status"] == "fail" else first for first, second in zip(got, again)]
                rows.extend(got)
    return rows


def error_row(unit: Unit, message: str) -> dict:
    return {
        "unit": unit.id, "module": unit.case.label, "preset": unit.case.preset, "kind": unit.case.kind,
        "config": unit.config, "pick": unit.pick, "batch": unit.batch, "precision": None, "mode": None,
        "status": "error", "failed": [], "error": message[-1500:],
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Workers and their supervisor
# --------------------------------------------------------------------------------------------------------------


def worker_main(device_name: str) -> int:
    """Read units (JSON lines) on stdin, write ``@@RESULT`` lines; exit 3 once the CUDA context is broken."""
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (libraries, compilers) goes to the log, not into the protocol
    sys.stdout = sys.stderr
    import torch

    import fusionkern.kernels  # noqa: F401  (import errors surface before READY)

    device = torch.device(device_name)
    results.write(READY + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        unit = Unit.from_json(line)
        start = time.time()
        sticky = False
        try:
            rows = run_unit(unit, device)
        except Exception as exc:  # a unit that raises is a failed unit; the others go on
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            print(f"unit {unit.id} raised:\n{traceback.format_exc()}", file=sys.stderr)
            rows = [error_row(unit, text)]
            sticky = device.type == "cuda" and bool(_STICKY_CUDA.search(text))
        results.write(RESULT + json.dumps({"unit": unit.id, "rows": rows, "seconds": time.time() - start}) + "\n")
        if sticky:
            return 3
    return 0


class _Worker:
    """One worker process: its pipe, the unit in flight, a line buffer."""

    def __init__(self, cmd: list[str], env: dict, log) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
        self.unit: Unit | None = None
        self.ready = False
        self.buffer = b""

    def send(self, unit: Unit | None) -> None:
        self.unit = unit
        assert self.proc.stdin is not None
        try:
            if unit is None:
                self.proc.stdin.close()
            else:
                self.proc.stdin.write((unit.to_json() + "\n").encode())
                self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: the EOF on its stdout reports it

    def lines(self) -> tuple[list[str], bool]:
        """Complete lines read now, and whether the pipe reached its end."""
        assert self.proc.stdout is not None
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        self.buffer += chunk
        *done, self.buffer = self.buffer.split(b"\n")
        return [d.decode(errors="replace") for d in done], not chunk


def supervise(
    units: Sequence[Unit], *, python: str, env: dict, deadline: float, workers: int, results: Path, log: Path,
    device: str = "cuda", max_spawns: int | None = None,
) -> list[dict]:  # fmt: skip
    """Run ``units`` on ``workers`` processes until done or ``deadline``; rows are appended to ``results`` (JSON
    lines) as they arrive, and returned. Units not finished by the deadline get a ``not run`` row."""
    pending = deque(units)
    rows: list[dict] = []
    spawns = 0
    max_spawns = max_spawns if max_spawns is not None else 2 * workers + 4
    cmd = [python, "-m", "gpucheck", "correctness-worker", "--device", device]
    sel = selectors.DefaultSelector()
    live: list[_Worker] = []

    def record(new: list[dict]) -> None:
        rows.extend(new)
        with results.open("a", encoding="utf-8") as f:
            for row in new:
                f.write(json.dumps(row) + "\n")

    def spawn() -> None:
        nonlocal spawns
        spawns += 1
        w = _Worker(cmd, env, logf)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        live.append(w)

    def retire(w: _Worker) -> None:
        sel.unregister(w.proc.stdout)
        live.remove(w)
        w.proc.stdout.close()
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait()

    with log.open("a", encoding="utf-8") as logf:
        for _ in range(min(workers, len(pending))):
            spawn()
        while live and time.time() < deadline:
            for key, _ in sel.select(timeout=max(0.05, min(1.0, deadline - time.time()))):
                w: _Worker = key.data
                lines, ended = w.lines()
                for line in lines:
                    if line.startswith(RESULT):
                        record(json.loads(line[len(RESULT):])["rows"])
                        w.unit = None
                    if line.startswith(READY) or line.startswith(RESULT):
                        w.ready = True
                        w.send(pending.popleft() if pending else None)
                if ended:
                    code = w.proc.wait()
                    if w.unit is not None:
                        why = "never became ready" if not w.ready else "exited"
                        record([error_row(w.unit, f"worker {why} (exit code {code}) during this unit; see check.log")])
                    retire(w)
                    if not w.ready and not rows:
                        pending.clear()  # workers cannot even start: every unit would fail the same way
                        record([error_row(u, f"no worker could start (exit code {code}); see check.log")
                                for u in units])  # fmt: skip
                    elif pending and spawns < max_spawns:
                        spawn()
        in_flight = [w.unit for w in live if w.unit is not None]
        for w in list(live):
            retire(w)
    left = in_flight + list(pending)
    if left:
        record([{**error_row(u, ""), "status": "not run", "error": "the phase's time ran out"} for u in left])
    return rows


def summarise(rows: Sequence[dict]) -> dict[str, Any]:
    """Counts per status, the failures and the autotune exclusions of a correctness run."""
    units: dict[str, str] = {}
    order = {"error": 0, "fail": 1, "not run": 2, "pass": 3}
    for row in rows:
        status = row["status"]
        if row["unit"] not in units or order[status] < order[units[row["unit"]]]:
            units[row["unit"]] = status
    counts = {s: sum(1 for v in units.values() if v == s) for s in ("pass", "fail", "error", "not run")}
    return {
        "units": len(units),
        "unit_status": counts,
        "comparisons": sum(1 for r in rows if r.get("precision")),
        "failed": [r for r in rows if r["status"] in ("fail", "error")],
        "exclusions": exclusions_from(rows),
    }
