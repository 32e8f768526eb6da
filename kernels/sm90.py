"""Static sm_90 (H100/H200) analysis of recorded Triton launches, no GPU needed.

What a launch will cost on Hopper is mostly decided at compile time: registers per thread (and whether ptxas had
to spill to local memory), shared memory, the occupancy those allow, and whether the dots became tensor-core
instructions (``wgmma`` / ``mma`` in the PTX) or plain FMAs. This module measures all of that without a GPU:

1. :func:`recording` replaces every kernel object of :mod:`.gabor_conv`, :mod:`.conv_mixpool`, :mod:`.dilated`
   and :mod:`.attention` by a recorder while tensors on the ``meta`` device (shapes only, no memory, no arithmetic)
   go through the launchers: the launchers run unchanged, so the recorded arguments, strides, constexprs and grids
   are exactly those of a real call. Autotuned kernels expand to the configs the launcher's own pruning keeps at
   that shape.
2. :func:`compile_launch` compiles one recorded launch for ``sm_90`` with Triton's own argument specialization
   (divisibility and alignment, as a real launch would get) and reads Triton's own ``ptxas -v`` log.
3. :func:`compile_launches` does that in fresh interpreters (``TRITON_INTERPRET`` unset: under the interpreter
   kernels cannot be lowered) and returns one :class:`LaunchFigures` per launch and config; :func:`markdown_table`
   renders them.

What gets recorded is the caller's business: :mod:`fusionkern.models.launches` records every launch a FusionNet
makes and writes the report (``python -m fusionkern.models.launches --report PATH``).

Occupancy and waves are computed from the H100's limits (:data:`H100`): they are what the hardware would allow, not
a measurement; timings need a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import torch

PRECISIONS = ("tf32", "ieee", "bf16")
"""``tf32``: float32 under torch's defaults (cuDNN conv TF32, so the kernels' default); ``ieee``: float32 with
torch's convolution precision set to IEEE (:func:`conv_precision`); ``bf16``: bfloat16 tensors."""

H100 = dict(sms=132, regs_per_sm=65536, max_warps_per_sm=64, max_blocks_per_sm=32, smem_per_sm=233472,
            smem_reserved_per_block=1024, reg_alloc_unit=256)  # fmt: skip
"""sm_90 limits (H100 SXM; the H200 has the same SM): 64 K registers and 228 KiB shared memory per SM, at most 64
warps and 32 blocks per SM, registers allocated per warp in units of 256, 1 KiB of shared memory reserved per
block."""

_KERNEL_MODULES = (
    "fusionkern.kernels._common",
    "fusionkern.kernels.gabor_conv",
    "fusionkern.kernels.conv_mixpool",
    "fusionkern.kernels.dilated",
    "fusionkern.kernels.attention",
)


@dataclass
class Launch:
    """One kernel launch, JSON-able: tensors become ``{"tensor": dtype}``, ints stay ints.

    ``configs`` are the meta-parameters (with ``num_warps`` and ``num_stages``) that can run it: one for a plain
    ``@triton.jit`` launch, every config the autotuner's pruning keeps for an autotuned one. ``programs`` gives the
    grid size for each config.
    """

    module: str
    kernel: str
    args: list
    constexprs: dict
    configs: list
    programs: list
    layer: str = ""
    where: list = field(default_factory=list)  # the runs that made this launch (e.g. [preset, mode, precision])
    compile_keys: list = field(default_factory=list)  # per config: what Triton would compile (specialization)

    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.args, self.constexprs, self.configs], sort_keys=True)


@dataclass
class LaunchFigures:
    """The compiled form of one launch at one config."""

    kernel: str
    layer: str
    precision: str  # the dot precision the launch asked for ("tf32" / "ieee"; bf16 inputs say "ieee")
    dtype: str  # the data pointers' element type
    config: str
    num_warps: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of local memory per thread
    shared: int  # bytes of shared memory per block
    wgmma: int  # wgmma.mma_async instructions in the PTX
    mma: int  # mma.sync instructions in the PTX
    cp_async: int  # async global-to-shared copies in the PTX (cp.async, TMA cp.async.bulk): pipelined loads
    has_dot: bool  # the kernel contains a tl.dot (so tensor cores are expected for tf32/bf16)
    occupancy: float  # resident warps / 64 on an H100 SM
    waves: float  # programs / (132 SMs x resident blocks per SM), for the largest grid of this config
    where: list
    error: str | None = None

    @property
    def tensor_cores(self) -> bool:
        return self.wgmma + self.mma > 0


# --------------------------------------------------------------------------------------------------------------
# Recording (runs where kernels are JITFunctions, i.e. without TRITON_INTERPRET)
# --------------------------------------------------------------------------------------------------------------


def _json_arg(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return {"tensor": str(a.dtype).replace("torch.", "")}
    if isinstance(a, bool) or a is None or isinstance(a, (int, float, str)):
        return a
    name = getattr(a, "name", None)  # tl.dtype constexprs (ACC_DTYPE)
    if name is not None and type(a).__module__.startswith("triton"):
        return {"tl": name}
    raise TypeError(f"cannot record a launch argument of type {type(a).__name__}")


class _Recorder:
    """Stands in for a kernel object (``JITFunction`` or ``Autotuner``): ``kernel[grid](*args, **kw)`` records."""

    def __init__(self, module: str, name: str, kernel: Any, sink: list[Launch], layer: list[str]):
        self.module, self.name, self.kernel, self.sink, self.layer = module, name, kernel, sink, layer

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._record(grid, args, kwargs)

    def _record(self, grid, args, kwargs) -> None:
        import triton

        tuner = self.kernel if isinstance(self.kernel, triton.runtime.Autotuner) else None
        fn = tuner.fn if tuner is not None else self.kernel
        nargs = dict(zip(fn.arg_names, args))
        if tuner is not None:
            configs = tuner.configs
            if tuner.early_config_prune is not None:
                configs = tuner.early_config_prune(configs, nargs, **kwargs)
            metas = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]
            constexprs = dict(kwargs)
        else:
            launch_opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            metas = [{"num_warps": launch_opts.get("num_warps", 4), "num_stages": launch_opts.get("num_stages", 3)}]
            constexprs = {k: v for k, v in kwargs.items() if k not in launch_opts}
        programs = []
        for meta in metas:
            g = grid({**nargs, **constexprs, **meta}) if callable(grid) else grid
            programs.append(int(math.prod(g)))
        self.sink.append(Launch(self.module, self.name if tuner is None else fn.__name__,
                                [_json_arg(a) for a in args], {k: _json_arg(v) for k, v in constexprs.items()},
                                metas, programs, self.layer[-1] if self.layer else ""))  # fmt: skip


@contextlib.contextmanager
def recording(sink: list[Launch], layer: list[str]) -> Iterator[None]:
    """Every kernel object of the kernel modules replaced by a :class:`_Recorder`; ``check_device`` accepts meta.

    Each launch made inside is appended to ``sink``, labelled with the last entry of ``layer`` (the caller appends
    the name of the layer it is about to run). Needs kernels that are ``JITFunction``s, i.e. no ``TRITON_INTERPRET``.
    """
    import importlib

    import triton

    saved = []
    for mod_name in _KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for name, value in list(vars(mod).items()):
            if isinstance(value, (triton.runtime.JITFunction, triton.runtime.Autotuner)) and not name.startswith(
                "__"
            ):
                if isinstance(value, triton.runtime.JITFunction) and not name.endswith("_kernel"):
                    continue  # device helpers, never launched
                saved.append((mod, name, value))
                setattr(mod, name, _Recorder(mod_name, name, value, sink, layer))
        if hasattr(mod, "check_device"):
            saved.append((mod, "check_device", mod.check_device))
            mod.check_device = lambda name, t: None
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


@contextlib.contextmanager
def conv_precision(precision: str) -> Iterator[None]:
    """torch's convolution fp32 precision for one recording (the kernels' ``allow_tf32=None`` follows it)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = precision != "ieee"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = previous
        return
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee" if precision == "ieee" else "tf32"
    try:
        yield
    finally:
        conv.fp32_precision = previous


# --------------------------------------------------------------------------------------------------------------
# Compilation and figures
# --------------------------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _build_args(launch: Launch, config: dict) -> tuple[list, dict]:
    import triton.language as tl

    def value(a):
        if isinstance(a, dict) and "tensor" in a:
            return torch.empty(16, dtype=getattr(torch, a["tensor"]))  # 16-byte aligned, as CUDA allocations are
        if isinstance(a, dict) and "tl" in a:
            return getattr(tl, a["tl"].replace("fp", "float").replace("bf16", "bfloat16"))
        return a

    kwargs = {k: value(v) for k, v in launch.constexprs.items()}
    kwargs.update(config)
    return [value(a) for a in launch.args], kwargs


def _specialize(launch: Launch, config: dict):
    """Triton's own binding of a launch for sm_90: (fn, target, backend, options, signature, constexprs, attrs)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    fn = getattr(fn, "fn", fn) if isinstance(fn, triton.runtime.Autotuner) else fn
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args, kwargs = _build_args(launch, config)
    bound, specialization, options = binder(*args, **kwargs)
    return (fn, target, *fn._pack_args(backend, kwargs, bound, specialization, options))


def compile_key(launch: Launch, config: dict) -> str:
    """What Triton compiles for this launch and config: equal keys give the same binary (argument values that
    specialize alike, e.g. two channel counts divisible by 16, compile once)."""
    _, _, options, signature, constexprs, attrs = _specialize(launch, config)
    return json.dumps([launch.module, launch.kernel, signature, {str(k): str(v) for k, v in constexprs.items()},
                       {str(k): str(v) for k, v in attrs.items()}, str(options)])  # fmt: skip


def compile_launch(launch: Launch, config: dict):
    """Compile ``launch`` at ``config`` for sm_90 as ``kernel[grid](...)`` would; returns (compiled, ptxas log).

    Needs a process without ``TRITON_INTERPRET=1``.
    """
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    fn, target, options, signature, constexprs, attrs = _specialize(launch, config)
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log (its flags, its ptxas)
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, log.getvalue()


def occupancy(registers: int, shared: int, num_warps: int, limits: dict = H100) -> tuple[float, int]:
    """(resident warps / max warps, resident blocks) per SM for a kernel of these resources."""
    warp_regs = math.ceil(max(registers, 1) * 32 / limits["reg_alloc_unit"]) * limits["reg_alloc_unit"]
    # registers are split over the SM's 4 sub-partitions; a warp lives in one of them
    warps_by_regs = (limits["regs_per_sm"] // 4 // warp_regs) * 4
    blocks = min(
        limits["max_blocks_per_sm"],
        warps_by_regs // num_warps,
        limits["max_warps_per_sm"] // num_warps,
        limits["smem_per_sm"] // (shared + limits["smem_reserved_per_block"]),
    )
    return blocks * num_warps / limits["max_warps_per_sm"], blocks


def figures(launch: Launch, index: int, compiled, log: str) -> LaunchFigures:
    """The :class:`LaunchFigures` of config ``index`` of ``launch`` from its compiled kernel and ptxas log."""
    config = launch.configs[index]
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"no ptxas -v figures in Triton's log for {launch.kernel}:\n{log[-2000:]}")
    ptx = compiled.asm["ptx"]
    shared = int(compiled.metadata.shared)
    occ, blocks = occupancy(int(regs.group(1)), shared, config["num_warps"])
    waves = launch.programs[index] / (H100["sms"] * max(blocks, 1))
    ttgir = compiled.asm.get("ttgir", "")
    data = [a["tensor"] for a in launch.args if isinstance(a, dict) and "tensor" in a]
    precision = launch.constexprs.get("DOT_PRECISION", launch.constexprs.get("INPUT_PRECISION", "-"))
    # the autotuned meta-parameters, or the tile constexprs of a plain launch (its launcher picked them)
    tiles = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")} or {
        k: v for k, v in launch.constexprs.items() if k.startswith("BLOCK_")
    }
    meta = ",".join(f"{k}={v}" for k, v in tiles.items())
    return LaunchFigures(
        kernel=launch.kernel, layer=launch.layer, precision=str(precision), dtype=data[0] if data else "-",
        config=f"{meta} w{config['num_warps']} s{config['num_stages']}".strip(), num_warps=config["num_warps"],
        registers=int(regs.group(1)), spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)),
        stack=int(spill.group(1)), shared=shared, wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        mma=len(re.findall(r"\bmma\.sync", ptx)), cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)", ptx)),
        has_dot="tt.dot" in ttgir or "ttng.warp_group_dot" in ttgir,
        occupancy=occ, waves=waves, where=launch.where,
    )  # fmt: skip


def unique_launches(launches: Sequence[Launch]) -> list[Launch]:
    """Merge launches that compile to the same kernel (same arguments' specialization, constexprs and configs)."""
    merged: dict[str, Launch] = {}
    for launch in launches:
        k = launch.key()
        if k in merged:
            seen = merged[k]
            seen.where += [w for w in launch.where if w not in seen.where]
            seen.programs = [max(a, b) for a, b in zip(seen.programs, launch.programs)]
        else:
            merged[k] = Launch(**{**asdict(launch), "where": list(launch.where)})
    return list(merged.values())


# --------------------------------------------------------------------------------------------------------------
# Fresh interpreters: compile without TRITON_INTERPRET
# --------------------------------------------------------------------------------------------------------------


def _child(request: dict) -> dict:
    """Entry of a child process: ``{"compile": [[launch, config index], ...]}`` returns their figures;
    ``{"version": true}`` the Triton version the child imports."""
    if "version" in request:
        import triton

        return {"triton": triton.__version__}
    results = []
    for launch_dict, index in request["compile"]:
        launch = Launch(**launch_dict)
        try:
            compiled, log = compile_launch(launch, launch.configs[index])
            results.append(asdict(figures(launch, index, compiled, log)))
        except Exception as exc:  # report every failure, keep compiling the others
            config = launch.configs[index]
            results.append({"kernel": launch.kernel, "layer": launch.layer, "config": json.dumps(config),
                            "error": f"{type(exc).__name__}: {exc}"[:2000]})  # fmt: skip
    return {"figures": results}


def _run_children(requests: list[dict], timeout: float, env_extra: dict | None = None) -> list[dict]:
    from fusionkern.kernels._common import run_isolated

    return run_isolated(["-m", "fusionkern.kernels.sm90"], requests, "SM90", "sm_90 analysis", timeout, env_extra)


def triton_version(env: dict | None = None) -> str:
    """The Triton version the compiling processes import (another one when ``env`` sets their ``PYTHONPATH``)."""
    if not env:
        import triton

        return triton.__version__
    return _run_children([{"version": True}], 120.0, env)[0]["triton"]


def compile_launches(
    launches: Sequence[Launch], *, jobs: int | None = None, timeout: float = 1800.0, env: dict | None = None
) -> list[LaunchFigures | dict]:
    """Compile every launch at each of its configs for sm_90, each distinct binary once (by ``compile_keys``, which
    the recording process fills with :func:`compile_key`).

    Returns one :class:`LaunchFigures` per (launch, config), in order, or a dict with ``error`` for one that failed
    to compile. ``jobs`` processes compile side by side (default: cores, at most 4); ``env`` adds environment
    variables to them (e.g. a ``PYTHONPATH`` with another triton).
    """
    # one compile per distinct binary; its figures serve every (launch, config) that compiles to it
    first: dict[str, tuple[Launch, int]] = {}
    for launch in launches:
        for i, k in enumerate(launch.compile_keys):
            first.setdefault(k, (launch, i))
    work = [[asdict(x), i] for x, i in first.values()]
    jobs = max(1, min(len(work), jobs or min(4, os.cpu_count() or 1)))
    replies = _run_children([{"compile": work[i::jobs]} for i in range(jobs)], timeout, env) if work else []
    by_key: dict[str, dict] = {}
    for (x, i), d in zip([w for j in range(jobs) for w in work[j::jobs]], [d for r in replies for d in r["figures"]]):
        by_key[x["compile_keys"][i]] = d
    results: list[LaunchFigures | dict] = []
    for launch in launches:
        for i, k in enumerate(launch.compile_keys):
            d = by_key[k]
            if d.get("error") is not None or "registers" not in d:
                results.append({**d, "layer": launch.layer})
                continue
            blocks = round(d["occupancy"] * H100["max_warps_per_sm"] / d["num_warps"])
            waves = launch.programs[i] / (H100["sms"] * max(blocks, 1))
            results.append(LaunchFigures(**{**d, "layer": launch.layer, "where": launch.where, "waves": waves}))
    return results


def markdown_table(results: Sequence[LaunchFigures]) -> str:
    """One row per compiled kernel and config, sorted by kernel, layer and config."""
    head = ("| kernel | layer | dtype | dot | config | regs | spill st/ld (B) | smem (KiB) | occupancy | waves | "
            "wgmma | mma | cp.async |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    rows = []
    for r in sorted(results, key=lambda r: (r.kernel, r.layer, r.dtype, r.precision, r.config)):
        rows.append(
            f"| {r.kernel} | {r.layer} | {r.dtype} | {r.precision} | {r.config} | {r.registers} | "
            f"{r.spill_stores}/{r.spill_loads} | {r.shared / 1024:.0f} | {r.occupancy:.1%} | {r.waves:.2f} | "
            f"{r.wgmma} | {r.mma} | {r.cp_async} |"
        )
    return "\n".join([head, *rows])


def digest(launch: Launch) -> str:
    """A short stable name for a launch (for test ids)."""
    return hashlib.sha1(launch.key().encode()).hexdigest()[:8]


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    print("SM90" + json.dumps(_child(json.load(sys.stdin))))
