"""Apply a Plan to a model so it really stores low-precision weights; save, load, and measure it.

`quantize_(model, plan)` replaces every parameter not kept in fp32 by its stored form (buffers
`<name>_q` and `<name>_scale` on the owning module) and registers a forward pre-hook that
dequantizes it to the compute dtype just before the module runs. Memory holds the small form;
compute runs in fp32 on a CPU (or fp16 on a GPU with `compute_dtype`).

File: `.safetensors`, kind "quantized", metadata {"config", "plan", "format"}; tensors are the
fp32 parameters under their names, float-cast ones under their names in their dtype, and integer
ones as `<name>.qdata` (int8, or uint8 with two int4 per byte) plus `<name>.scale` (fp32 per output
channel, or fp16 per group for int4-g32 / int4-g64).

Compute modes (`quantize_(model, plan, compute=...)`):
    "dequantize"    (default) the pre-hook above: FP32 (or `set_compute_dtype`) math on the dequantized
                    weights. Every shipped number uses this mode; speed work changes its outputs at most by
                    float rounding (lafq.model's CPU fast paths, pinned in tests/test_fast_path.py).
    "int8-dynamic"  CPU only, opt-in: each Linear whose weight is stored int8 or per-channel int4 runs
                    torch.ao's dynamically quantized int8 Linear (fbgemm via the `x86` engine): the stored
                    integer codes and scales are the weight (int4 codes are valid int8 codes), activations
                    are quantized per tensor on the fly. Convolutions other than 1x1 with at least
                    INT8_CONV_MIN_CHANNELS (32) input channels run oneDNN's int8 convolution with an fp32
                    output (`_Int8Conv2d`: the stored codes and scales, activations quantized per call to
                    uint8 over their min..max); 1x1 convs and narrower convs keep the dequantize path,
                    where int8 measured slower (see INT8_CONV_MIN_CHANNELS). (torch.ao's dynamic Conv2d is not
                    used: it returns wrong values in torch 2.14.1, max |error| 2.6-4.7 on one conv of
                    non-negative inputs where the FP32 conv of its own dequantized weight is off by 0.02.)
                    Outputs differ from FP32 math: fidelity is measured (docs/benchmarks.md).
                    Group-wise int4 and the class embedding keep the dequantize path. Such a model cannot
                    be saved: save the default one and call `use_int8_kernels` after loading.
                    torch 2.14 warns that torch.ao's quantized tensors are deprecated (pytorch#184982):
                    the mode is an experiment to measure, not a dependency of anything shipped.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, save_file
from .plan import Plan, param_shapes
from .precision import (FLOAT_DTYPES, GROUP, PACKED, PRECISIONS, QMAX, Stored, data_bytes, load, numel, scale_bytes,
                        scale_shape, store)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return model.get_submodule(mod_name) if mod_name else model, attr


class _Hold:
    """How many sampling calls currently keep this model's dequantized weights (see hold_dequantized)."""

    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()

    def __deepcopy__(self, memo):  # a copied model gets its own counter (locks cannot be copied)
        return _Hold()


class _Dequantize:
    """Forward pre-hook: rebuild the module's quantized parameters in the compute dtype, once per
    forward, or once per `hold_dequantized` block (a sampling call runs 2 x steps forwards)."""

    lafq_weight_hook = True  # only sets weights: lafq.model's fast paths may run it themselves or more than once

    def __init__(self, attrs: list[str]):
        self.attrs = attrs

    def __call__(self, module, _inputs):
        if module._lafq_fresh and module._lafq_hold.count > 0:
            return
        dtype = getattr(module, "_lafq_dtype", torch.float32)
        for attr in self.attrs:
            setattr(module, attr, _laid_out(module, attr, load(module._lafq_stored[attr], dtype)))
        module._lafq_fresh = module._lafq_hold.count > 0


@contextmanager
def hold_dequantized(model: nn.Module):
    """Within the block, each quantized weight is dequantized by the first forward and reused by the
    rest (no-op for an unquantized model). Safe with concurrent callers: the weights are only
    rebuilt again after the last block ends."""
    hold = next((m._lafq_hold for m in model.modules() if hasattr(m, "_lafq_hold")), None)
    if hold is None:
        yield model
        return
    with hold.lock:
        hold.count += 1
    try:
        yield model
    finally:
        with hold.lock:
            hold.count -= 1
            if hold.count == 0:
                _mark_stale(model)


def _mark_stale(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "_lafq_fresh"):
            m._lafq_fresh = False


def _laid_out(module: nn.Module, attr: str, w: torch.Tensor) -> torch.Tensor:
    """Give a dequantized weight the memory layout its fp32 original had (channels-last convs run faster)."""
    if attr not in module._lafq_channels_last:
        return w
    # empty_like gives canonical strides even where the layout is ambiguous (a 1-channel conv),
    # so a model quantized in memory and its reload from file run identical kernels.
    return torch.empty_like(w, memory_format=torch.channels_last).copy_(w)


def _install(model: nn.Module, stored: dict[str, Stored]) -> None:
    by_module: dict[nn.Module, list[str]] = {}
    hold = _Hold()
    for name, s in stored.items():
        mod, attr = _owner(model, name)
        original = mod._parameters.pop(attr)
        if not hasattr(mod, "_lafq_stored"):
            mod._lafq_stored, mod._lafq_channels_last = {}, set()
            mod._lafq_hold, mod._lafq_fresh = hold, False
        mod._lafq_stored[attr] = s
        if original.dim() == 4 and original.is_contiguous(memory_format=torch.channels_last):
            mod._lafq_channels_last.add(attr)
        # Buffers make the stored form move with .to(device) and show in memory accounting.
        mod.register_buffer(f"{attr}_q", s.data, persistent=False)
        if s.scale is not None:
            mod.register_buffer(f"{attr}_scale", s.scale, persistent=False)
        setattr(mod, attr, _laid_out(mod, attr, load(s)))  # a plain tensor until the first hook call
        by_module.setdefault(mod, []).append(attr)
    for mod, attrs in by_module.items():
        mod.register_forward_pre_hook(_Dequantize(attrs))


def _sync_buffers(model: nn.Module) -> None:
    """After .to(device), point the stored forms at the moved buffers."""
    for mod in model.modules():
        for attr, s in getattr(mod, "_lafq_stored", {}).items():
            s.data = getattr(mod, f"{attr}_q")
            if s.scale is not None:
                s.scale = getattr(mod, f"{attr}_scale")


COMPUTE_MODES = ("dequantize", "int8-dynamic")
# oneDNN's int8 convolution with an fp32 output (the op inductor's x86 quantization lowers to). Only with
# VNNI: without it oneDNN's u8 x s8 products saturate in int16 (47% error on all-positive inputs against
# weights at +-127, measured with ONEDNN_MAX_CPU_ISA=AVX512_CORE), so such CPUs keep the dequantize path.
ONEDNN_CONV = (hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise")
               and getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
# Guided DDIM-5 sampling of 64 images, uniform INT8, 2 threads, idle Intel Xeon with AVX-512 VNNI, medians
# of 7 interleaved repeats, time relative to FP32 (both with lafq.model's CPU fast paths): int8 3x3 convs from
# 32 input channels 0.79x, from 64 channels 0.83x; 1x1 convs as torch.ao int8 Linears over pixels 0.88x
# (with the 64 rule), as oneDNN int8 convs 0.81x (with the 32 rule): slower than their FP32 GEMMs, so they
# keep the dequantize path. (Before the channels-last min/max fix in _Int8Conv2d the 64 rule gave 1.00x.)
INT8_CONV_MIN_CHANNELS = 32


def quantize_(model: nn.Module, plan: Plan, compute: str = "dequantize") -> nn.Module:
    """Quantize `model` in place following `plan` (names not in the plan stay fp32); returns it, in eval mode.
    `compute`: one of COMPUTE_MODES (module docstring)."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"unknown compute mode {compute!r}; choose one of {COMPUTE_MODES}")
    if getattr(model, "lafq_plan", None) is not None:
        raise ValueError("model is already quantized; quantize a fresh copy of the FP32 model")
    from .model import to_inference_layout

    shapes = param_shapes(model)
    plan.validate(shapes)
    to_inference_layout(model)  # the layout quantized_from_file builds, so a reload is bit-identical
    params = dict(model.named_parameters())
    stored = {n: store(params[n], p) for n, p in plan.precisions.items() if p != "fp32"}
    _install(model, stored)
    model.lafq_plan = plan
    model.lafq_stored = stored
    model.eval().requires_grad_(False)
    return use_int8_kernels(model) if compute == "int8-dynamic" else model


class _Int8Conv2d(nn.Module):
    """A Conv2d on oneDNN's int8 convolution (`torch.ops.onednn.qconv2d_pointwise`, VNNI on x86) with an
    fp32 output: the weight is the stored int8 codes and per-channel scales, unchanged; activations are
    quantized per call, per tensor, asymmetric uint8 over their own min..max (one `aminmax` and one
    `quantize_per_tensor`). Per conv this adds ~1.2% mean relative error against the FP32 conv of
    the same dequantized weight (8-bit activations), measured on random inputs."""

    def __init__(self, conv: nn.Conv2d, codes: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = (list(conv.stride), list(conv.padding),
                                                                 list(conv.dilation), conv.groups)
        self.w_scale = scale.float().contiguous()
        self.w_zero = torch.zeros(len(scale), dtype=torch.int32)
        bias = conv.bias  # already dequantized to fp32 when stored small
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.codes = codes.reshape(conv.weight.shape).to(torch.int8).contiguous(memory_format=torch.channels_last)
        self.int8_bytes = self.codes.numel()  # the packed weight is opaque to torch: its size, for memory reports
        self._pack()

    def _pack(self) -> None:
        self.packed = torch.ops.onednn.qconv_prepack(self.codes, self.w_scale, 1.0, 0, self.stride, self.padding,
                                                     self.dilation, self.groups, None)

    # The packed weight is an opaque oneDNN tensor that cannot be copied or pickled: copies re-pack the codes.
    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if k != "packed"}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._pack()

    def forward(self, x):
        # On a channels-last tensor aminmax first makes a contiguous copy (0.82 vs 0.20 ms at 128 x 64 x 14 x 14):
        # the permuted view is contiguous, so reduce that.
        lo, hi = torch.aminmax(x.permute(0, 2, 3, 1) if x.is_contiguous(memory_format=torch.channels_last) else x)
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)  # the range must hold 0 (zero padding)
        scale = (hi - lo) / 255 or 1.0
        zero = int(round(-lo / scale))
        q = torch.quantize_per_tensor(x.float(), scale, zero, torch.quint8).int_repr()
        return torch.ops.onednn.qconv2d_pointwise(q, scale, zero, self.packed, self.w_scale, self.w_zero, self.bias,
                                                  self.stride, self.padding, self.dilation, self.groups, 1.0, 0,
                                                  torch.float32, "none", [], "")


def use_int8_kernels(model: nn.Module) -> nn.Module:
    """Switch a quantized model (in place) to the "int8-dynamic" compute mode; returns it."""
    from torch.ao.nn.quantized import dynamic as nnqd

    from .precision import unpack_int4

    if getattr(model, "lafq_plan", None) is None:
        raise ValueError("int8 kernels need a quantized model: quantize_ it first")
    if getattr(model, "lafq_compute", "dequantize") == "int8-dynamic":
        return model
    if any(b.device.type != "cpu" for b in model.buffers()):
        raise ValueError("the int8-dynamic compute mode runs torch.ao CPU kernels; keep the model on the CPU")
    for name, mod in list(model.named_modules()):
        s = getattr(mod, "_lafq_stored", {}).get("weight")
        if s is None or s.precision not in ("int8", "int4"):
            continue
        codes = unpack_int4(s.data, s.shape) if s.precision in PACKED else s.data
        if isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1) and mod.padding_mode == "zeros" and ONEDNN_CONV \
                and mod.in_channels >= INT8_CONV_MIN_CHANNELS and not isinstance(mod.padding, str):
            parent, attr = _owner(model, name)
            setattr(parent, attr, _Int8Conv2d(mod, codes, s.scale))
            continue
        if not isinstance(mod, nn.Linear):
            continue
        qweight = torch._make_per_channel_quantized_tensor(
            codes.reshape(s.shape[0], -1).contiguous(), s.scale.double(), torch.zeros(len(s.scale), dtype=torch.long), 0)
        bias = mod.bias  # already dequantized to fp32 when stored small
        bias = None if bias is None else bias.detach().float().contiguous()
        fast = nnqd.Linear(qweight.shape[1], qweight.shape[0], bias_=bias is not None, dtype=torch.qint8)
        fast.set_weight_bias(qweight, bias)
        parent, attr = _owner(model, name)
        setattr(parent, attr, fast)
    model.lafq_compute = "int8-dynamic"
    return model


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Run a quantized model in `dtype` (e.g. fp16 on a GPU): remaining parameters cast, stored ones dequantized to it."""
    model.to(dtype=dtype) if dtype != torch.float32 else model.float()
    _sync_buffers(model)
    _mark_stale(model)
    for mod in model.modules():
        if hasattr(mod, "_lafq_stored"):
            mod._lafq_dtype = dtype
    return model


def to_device(model: nn.Module, device) -> nn.Module:
    if getattr(model, "lafq_compute", "dequantize") == "int8-dynamic" and torch.device(device).type != "cpu":
        raise ValueError("the int8-dynamic compute mode runs CPU kernels; keep the model on the CPU")
    model.to(device)
    _sync_buffers(model)
    _mark_stale(model)
    return model


# -- size --------------------------------------------------------------------------------------

@dataclass
class SizeReport:
    total_bytes: int
    fp32_bytes: int
    bytes_by_dtype: dict[str, int]  # data bytes per precision (numel × element size; int4 = numel / 2)
    tensors_by_dtype: dict[str, int]
    params_by_dtype: dict[str, int]
    scale_bytes: int
    numel: int
    file_bytes: int | None = None  # real size on disk, when saved

    @property
    def reduction_pct(self) -> float:
        return 100.0 * (1 - self.total_bytes / self.fp32_bytes)

    @property
    def pct_of_fp32(self) -> float:
        return 100.0 * self.total_bytes / self.fp32_bytes

    @property
    def avg_bits(self) -> float:
        return 8.0 * self.total_bytes / self.numel

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "fp32_bytes": self.fp32_bytes, "pct_of_fp32": round(self.pct_of_fp32, 3),
                "reduction_pct": round(self.reduction_pct, 3), "avg_bits": round(self.avg_bits, 4),
                "bytes_by_dtype": self.bytes_by_dtype, "tensors_by_dtype": self.tensors_by_dtype,
                "params_by_dtype": self.params_by_dtype, "scale_bytes": self.scale_bytes, "numel": self.numel,
                "file_bytes": self.file_bytes}

    def table(self) -> str:
        rows = [f"{'dtype':6} {'tensors':>8} {'params':>10} {'bytes':>10}"]
        for p in PRECISIONS:
            if self.tensors_by_dtype.get(p):
                rows.append(f"{p:6} {self.tensors_by_dtype[p]:8d} {self.params_by_dtype[p]:10d} {self.bytes_by_dtype[p]:10d}")
        rows.append(f"{'scales':6} {'':8} {'':10} {self.scale_bytes:10d}")
        rows.append(f"total {self.total_bytes} bytes = {self.pct_of_fp32:.2f}% of FP32 ({self.fp32_bytes} bytes), "
                    f"{self.reduction_pct:.2f}% smaller, {self.avg_bits:.2f} bits/weight")
        if self.file_bytes is not None:
            rows.append(f"on disk: {self.file_bytes} bytes")
        return "\n".join(rows)


def size_report(plan: Plan, shapes: dict[str, tuple]) -> SizeReport:
    """Sizes from the plan alone (no quantization needed): what the live readouts call."""
    by = {p: 0 for p in PRECISIONS}
    cnt = {p: 0 for p in PRECISIONS}
    par = {p: 0 for p in PRECISIONS}
    scales = 0
    for n, shape in shapes.items():
        p = plan.precisions.get(n, "fp32")
        by[p] += data_bytes(shape, p)
        cnt[p] += 1
        par[p] += numel(shape)
        scales += scale_bytes(shape, p)
    total_numel = sum(numel(s) for s in shapes.values())
    return SizeReport(sum(by.values()) + scales, 4 * total_numel, by, cnt, par, scales, total_numel)


# -- files -------------------------------------------------------------------------------------

def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in model.named_parameters()}
    for name, s in model.lafq_stored.items():
        if s.precision in FLOAT_DTYPES:
            out[name] = s.data
        else:
            out[f"{name}.qdata"] = s.data
            out[f"{name}.scale"] = s.scale
    return out


def save_quantized(path: str | os.PathLike, model: nn.Module) -> int:
    """Write the quantized model atomically; returns the file size in bytes."""
    if getattr(model, "lafq_compute", "dequantize") != "dequantize":
        raise ValueError("save a model quantized with the default compute mode; call use_int8_kernels after loading")
    plan: Plan = model.lafq_plan
    save_file(path, quantized_tensors(model), {"kind": "quantized", "config": model.cfg.to_dict(),
                                               "plan": {"precisions": plan.precisions, "policy": plan.policy}})
    return Path(path).stat().st_size


def _expected_tensors(plan: Plan, shapes: dict[str, tuple]) -> dict[str, tuple[tuple, tuple]]:
    """File tensor name -> (shape, allowed dtypes) for a plan."""
    out = {}
    for n, shape in shapes.items():
        p = plan.precisions.get(n, "fp32")
        if p in QMAX:
            out[f"{n}.qdata"] = ((data_bytes(shape, p),) if p in PACKED else shape,
                                 (torch.uint8,) if p in PACKED else (torch.int8,))
            out[f"{n}.scale"] = (scale_shape(shape, p), (torch.float16,) if p in GROUP else (torch.float32,))
        else:
            out[n] = (shape, (FLOAT_DTYPES[p],))
    return out


def _check_stored_tensors(tensors: dict, plan: Plan, shapes: dict[str, tuple], name: str) -> None:
    want = _expected_tensors(plan, shapes)
    missing = sorted(set(want) - set(tensors))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{name}: missing tensor {missing[0]!r}{more} that its plan needs")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise CheckpointError(f"{name}: {len(extra)} tensors its plan does not account for (e.g. {extra[:3]})")
    for k, (shape, dtypes) in want.items():
        t = tensors[k]
        if t.dtype not in dtypes:
            raise CheckpointError(f"{name}: {k} is {str(t.dtype).replace('torch.', '')}, expected "
                                  f"{' or '.join(str(d).replace('torch.', '') for d in dtypes)}")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{name}: {k} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{name}: {k} holds NaN or infinite values")
        if k.endswith(".scale") and bool((t <= 0).any()):
            raise CheckpointError(f"{name}: {k} holds scales <= 0")


def quantized_from_file(tensors: dict, meta: dict, name: str, expect_config=None):
    """Rebuild a quantized U-Net from file contents without re-quantizing (bit-identical reload).

    Every tensor is checked before use: the names the plan implies (no more, no fewer), shapes, dtypes
    (fp32 / fp16 / bf16 data, int8 or packed uint8 codes, fp32 per-channel or fp16 per-group scales) and finite
    values; `expect_config`
    (a UNetConfig) rejects another network's file. Raises CheckpointError naming the first problem.
    """
    from .model import UNet, UNetConfig, to_inference_layout
    from .planfile import plan_from_dict

    try:
        cfg = UNetConfig.from_dict(meta["config"])
        plan = plan_from_dict(meta["plan"], "quantized model's plan")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: invalid quantized-model metadata ({str(e)[:160]})") from None
    if expect_config is not None and cfg != expect_config:
        from .checkpoint import config_mismatch
        diff = config_mismatch(expect_config.to_dict(), cfg.to_dict())
        raise CheckpointError(f"{name} is another network: " + "; ".join(diff[:3]))
    model = to_inference_layout(UNet(cfg))  # the same layout as a freshly loaded FP32 model
    shapes = param_shapes(model)
    try:
        plan.validate(shapes)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    _check_stored_tensors(tensors, plan, shapes, name)
    stored, plain = {}, {}
    for n, shape in shapes.items():
        p = plan.precisions.get(n, "fp32")
        if p in QMAX:
            stored[n] = Stored(p, shape, tensors[f"{n}.qdata"], tensors[f"{n}.scale"])
        elif p == "fp32":
            plain[n] = tensors[n]
        else:
            stored[n] = Stored(p, shape, tensors[n])
    model.load_state_dict(plain, strict=False)
    _install(model, stored)
    model.lafq_plan = plan
    model.lafq_stored = stored
    return model.eval().requires_grad_(False)
