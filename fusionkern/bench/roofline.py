"""The roofline: what one site costs in FLOPs and bytes, and what this machine can do in the same run.

Costs per site (a forward pass of FusionNet, weights shared by the batch):

* FLOPs: :func:`fusionkern.models.profile` (convolutions and linear layers, a multiply-add counted as two), two
  counts: ``nominal`` (every output position times every kernel tap) and ``effective`` (only the multiply-adds whose
  input tap lies inside the unpadded input map). The native preset's small maps put many taps on zero padding
  (the dilated block on a 4 x 4 map, 3 x 3 head convolutions on 4 x 4 and 2 x 2 maps), which a dense kernel
  multiplies but which do no work; intensity, time floors and shares of the peak use the effective count.
* Bytes, two models, both in float32 (a 16-bit run moves half):

  - ``floor``: the fewest bytes any implementation must move: the input read once, the logits written once, every
    weight read once per batch (``(input + output) + params / batch``). No fused kernel can go below it.
  - ``eager``: what the unfused reference moves: every ATen operator of the eager forward reads each input tensor
    once and writes each output once; views move nothing; a tensor that is a view into a larger one counts at its
    own size. Counted with a ``TorchDispatchMode`` at batch 1 and 2, which splits it into a per-site part and a
    per-batch part (weights), then stated at the plan's ``cost_batch``.

* Arithmetic intensity: FLOPs over bytes. The time floor of a site is ``max(FLOPs / peak, bytes / bandwidth)``
  with the matmul peak and the copy bandwidth measured in the same run (``roofline/matmul``, ``roofline/copy``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fusionkern.bench.cases import DTYPES, Plan, TimedCall, build_fusionnet, site_inputs


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` as an operator sees it: its own elements, at most its storage (for expanded tensors)."""
    try:
        storage = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        storage = t.nbytes
    return min(t.numel() * t.element_size(), storage)


class ByteCounter(TorchDispatchMode):
    """Sums the bytes every ATen operator reads (tensor inputs) and writes (tensor outputs); views are free."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.written = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):
            return out
        self.ops += 1
        self.read += sum(_tensor_bytes(t) for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor))
        self.written += sum(_tensor_bytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out

    @property
    def total(self) -> int:
        return self.read + self.written


def eager_bytes(model: torch.nn.Module, batch: int) -> int:
    """Bytes the eager forward of ``model`` moves on ``batch`` random sites (see :class:`ByteCounter`)."""
    x = site_inputs(model, batch)
    with torch.no_grad(), ByteCounter() as counter:
        model(x)
    return counter.total


def site_costs(preset: str, plan: Plan) -> dict[str, Any]:
    """FLOPs, bytes (floor and eager) and arithmetic intensity per site of FusionNet at ``preset``.

    Returns:
        ``params``, ``flops_per_site_effective``, ``flops_per_site_nominal``, ``bytes_floor_per_site``,
        ``bytes_eager_per_site``, ``eager_bytes_per_site_activations``, ``eager_bytes_per_batch_weights``,
        ``intensity_floor``, ``intensity_eager`` (effective FLOP/byte), ``cost_batch``, ``width``, ``input_size``.
    """
    from fusionkern.models import profile

    model = build_fusionnet(preset, plan.model_width)
    prof = profile(model)
    flops = prof["gflops_per_site_effective"] * 1e9
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    weight_bytes = 4 * (params + buffers)
    io_bytes = 4 * (5 * 3 * model.input_size**2 + model.fc.out_features)
    b = plan.cost_batch
    one, two = eager_bytes(model, 1), eager_bytes(model, 2)
    per_site = two - one
    per_batch = max(0, one - per_site)
    floor = io_bytes + weight_bytes / b
    eager = per_site + per_batch / b
    return {
        "preset": preset,
        "width": plan.model_width,
        "input_size": model.input_size,
        "params": params,
        "cost_batch": b,
        "flops_per_site_effective": flops,
        "flops_per_site_nominal": prof["gflops_per_site"] * 1e9,
        "bytes_floor_per_site": floor,
        "bytes_eager_per_site": eager,
        "eager_bytes_per_site_activations": per_site,
        "eager_bytes_per_batch_weights": per_batch,
        "intensity_floor": flops / floor,
        "intensity_eager": flops / eager,
    }


def matmul_call(dtype_name: str, plan: Plan, device: torch.device) -> TimedCall:
    """``torch.matmul`` of two random ``n x n`` matrices (never zeros: they can run faster than real data), with
    rotation over enough pairs to overflow a GPU's L2 cache; ``items`` is the FLOPs of one call (``2 n^3``)."""
    n = plan.matmul_n
    dtype = DTYPES[dtype_name]
    pairs = 1 if device.type != "cuda" else 2
    gen = torch.Generator().manual_seed(11)
    mats = [(torch.randn(n, n, generator=gen).to(device, dtype), torch.randn(n, n, generator=gen).to(device, dtype))
            for _ in range(pairs)]  # fmt: skip
    out = torch.empty(n, n, device=device, dtype=dtype)
    state = {"i": 0}

    def run():
        a, b = mats[state["i"] % pairs]
        state["i"] += 1
        return torch.matmul(a, b, out=out)

    rows = min(n, 256)  # checked on the first rows, against float64 on the CPU
    ref = mats[0][0][:rows].double().cpu() @ mats[0][1].double().cpu()
    err = float((run()[:rows].double().cpu() - ref).norm() / ref.norm())
    limit = 1e-3 if dtype_name == "fp32" else 3e-2
    if not err <= limit:
        raise AssertionError(f"matmul {dtype_name} relative error {err:.2e} > {limit:.0e}")
    return TimedCall(run, items=2 * n**3, info={"n": n, "check_rel_err": err, "unit": "FLOP"})


def copy_call(plan: Plan, device: torch.device) -> TimedCall:
    """A device-to-device copy of ``copy_mib`` MiB of random float32; ``items`` counts bytes read plus written."""
    n = plan.copy_mib * 2**20 // 4
    src = torch.rand(n, generator=torch.Generator().manual_seed(13)).to(device)
    dst = torch.empty_like(src)

    def run():
        return dst.copy_(src)

    run()
    if not torch.equal(dst, src):
        raise AssertionError("the copy did not reproduce its source")
    return TimedCall(run, items=2 * src.nbytes, info={"mib": plan.copy_mib, "unit": "byte"})


def time_floor(flops: float, nbytes: float, peak_flops: float | None, bandwidth: float | None) -> float | None:
    """``max(flops / peak, bytes / bandwidth)`` in seconds, or None without both ceilings."""
    if not peak_flops or not bandwidth or math.isnan(peak_flops) or math.isnan(bandwidth):
        return None
    return max(flops / peak_flops, nbytes / bandwidth)
