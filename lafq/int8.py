"""The opt-in integer compute modes of a quantized model: "int8-dynamic" and "w8a8" (integer kernels on the
stored codes; activations quantized per call, or with static scales calibrated per timestep bin).

CPU only. Each Linear whose weight is stored int8 or per-channel int4 runs torch.ao's dynamically
quantized int8 Linear (fbgemm via the `x86` engine): the stored integer codes and scales are the weight
(int4 codes are valid int8 codes), activations are quantized per tensor on the fly. Convolutions other
than 1x1 with at least INT8_CONV_MIN_CHANNELS (32) input channels run oneDNN's int8 convolution with an
fp32 output (`_Int8Conv2d`: the stored codes and scales, activations quantized per call to uint8 over
their min..max); 1x1 convs and narrower convs keep the dequantize path, where int8 measured slower (see
INT8_CONV_MIN_CHANNELS). (torch.ao's dynamic Conv2d is not used: it returns wrong values in torch 2.14.1,
max |error| 2.6-4.7 on one conv of non-negative inputs where the FP32 conv of its own dequantized weight
is off by 0.02.) Outputs differ from FP32 math: fidelity is measured (docs/benchmark-runs.md). Group-wise
int4 and the class embedding keep the dequantize path. Such a model cannot be saved: save the default
one and call `use_int8_kernels` after loading. torch 2.14 warns that torch.ao's quantized tensors are
deprecated (pytorch#184982): the mode is an experiment to measure, not a dependency of anything shipped.

"w8a8" (`calibrate_activations`, `use_w8a8`): the same convolutions with each activation's uint8 scale and zero
point fixed per timestep bin from a calibration run (Q-Diffusion's time-step-aware calibration: ranges drift over
the steps, up to 2.9x between bins on the shipped U-Net), so no per-call min/max; the bin follows the timestep the
model is called with (a forward pre-hook). Layers named in `keep_float`, and any without a calibrated range, keep
float activations: `model.lafq_activations` is the plan's activation precision per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .precision import codes as stored_codes
from .quantize import _owner

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
    if getattr(model, "lafq_plan", None) is None:
        raise ValueError("int8 kernels need a quantized model: quantize it first")
    if getattr(model, "lafq_compute", "dequantize") == "int8-dynamic":
        return model
    if any(b.device.type != "cpu" for b in model.buffers()):
        raise ValueError("the int8-dynamic compute mode runs torch.ao CPU kernels; keep the model on the CPU")
    for name, kind in int8_layers(model).items():
        mod = model.get_submodule(name)
        s = mod._lafq_stored["weight"]
        parent, attr = _owner(model, name)
        setattr(parent, attr, _Int8Conv2d(mod, stored_codes(s), s.scale) if kind == "conv" else _dynamic_linear(mod, s))
    model.lafq_compute = "int8-dynamic"
    return model


def _dynamic_linear(mod: nn.Linear, s) -> nn.Module:
    """torch.ao's dynamically quantized int8 Linear on the stored codes and per-channel scales (int4 codes are
    valid int8 codes); activations quantized per call."""
    from torch.ao.nn.quantized import dynamic as nnqd

    codes = stored_codes(s)
    qweight = torch._make_per_channel_quantized_tensor(
        codes.reshape(s.shape[0], -1).contiguous(), s.scale.double(), torch.zeros(len(s.scale), dtype=torch.long), 0)
    bias = None if mod.bias is None else mod.bias.detach().float().contiguous()  # fp32 already when stored small
    fast = nnqd.Linear(qweight.shape[1], qweight.shape[0], bias_=bias is not None, dtype=torch.qint8)
    fast.set_weight_bias(qweight, bias)
    return fast


# -- static W8A8: calibrated activation ranges per timestep bin ------------------------------------------------

def int8_layers(model: nn.Module) -> dict[str, str]:
    """The layers whose activations can run int8: {name: "conv" | "linear"} (the rule of use_int8_kernels: weights
    stored int8 or per-channel int4; convs other than 1x1 with at least INT8_CONV_MIN_CHANNELS inputs, on oneDNN)."""
    out = {}
    for name, mod in model.named_modules():
        s = getattr(mod, "_lafq_stored", {}).get("weight")
        if s is None or s.precision not in ("int8", "int4"):
            continue
        if isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1) and mod.padding_mode == "zeros" and ONEDNN_CONV \
                and mod.in_channels >= INT8_CONV_MIN_CHANNELS and not isinstance(mod.padding, str):
            out[name] = "conv"
        elif isinstance(mod, nn.Linear):
            out[name] = "linear"
    return out


@dataclass(frozen=True)
class ActivationRanges:
    """Calibrated input ranges of a quantized model's int8-activation layers, per timestep bin (Q-Diffusion:
    activation ranges drift over the denoising steps, so one static range per layer is either too wide early or
    clips late). `edges`: bins + 1 ascending model timesteps (bin b holds edges[b] <= t < edges[b + 1], the last
    also t = edges[-1]); `ranges[layer]`: (bins, 2) float32, each bin's [min, max] of the layer's input seen in
    calibration (0 always inside: zero padding); `meta`: how they were calibrated (n, steps, guidance, seed, plan)."""
    edges: tuple[float, ...]
    ranges: dict
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if len(self.edges) < 2 or list(self.edges) != sorted(self.edges):
            raise ValueError(f"edges must be at least two ascending timesteps, got {self.edges}")
        bins = len(self.edges) - 1
        for k, r in self.ranges.items():
            if not torch.is_tensor(r) or tuple(r.shape) != (bins, 2) or not torch.isfinite(r).all() \
                    or (r[:, 0] > 0).any() or (r[:, 1] < 0).any():
                raise ValueError(f"activation range of {k!r} must be ({bins}, 2) finite [min <= 0, max >= 0] per bin")

    @property
    def bins(self) -> int:
        return len(self.edges) - 1

    def bin_of(self, t: float) -> int:
        import bisect
        return min(max(bisect.bisect_right(self.edges, float(t)) - 1, 0), self.bins - 1)

    def relative_widths(self) -> dict[str, torch.Tensor]:
        """Per layer, each bin's range (max - min) over the layer's narrowest bin's: (bins,), at least 1."""
        w = {k: (r[:, 1] - r[:, 0]) for k, r in self.ranges.items()}
        return {k: v / v.min().clamp_min(1e-12) for k, v in w.items()}

    def drift(self) -> dict[str, float]:
        """Per layer, the widest bin's range over the narrowest's: how far one static range would be off."""
        return {k: float(v.max()) for k, v in self.relative_widths().items()}

    def digest(self) -> str:
        """Of the edges and every layer's ranges: two calibrations that would scale alike share it."""
        import hashlib
        h = hashlib.sha256(repr(list(self.edges)).encode())
        for k in sorted(self.ranges):
            h.update(k.encode() + self.ranges[k].float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path) -> None:
        from .checkpoint import save_file
        save_file(path, {f"range.{k}": v for k, v in self.ranges.items()},
                  {"kind": "activation-ranges", "edges": list(self.edges), "calibration": self.meta})

    @classmethod
    def load(cls, path) -> "ActivationRanges":
        from .checkpoint import CheckpointError, load_file

        tensors, meta = load_file(path, kind="activation-ranges")
        try:
            return cls(tuple(float(e) for e in meta["edges"]),
                       {k[len("range."):]: v.float() for k, v in tensors.items() if k.startswith("range.")},
                       meta.get("calibration", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: invalid activation ranges ({e})") from None


def _timestep(args, kwargs):
    """The one timestep of a call (samplers call with one t for the whole batch); a batch of different timesteps
    would need different static scales per sample: refused in one line."""
    t = kwargs.get("timestep", kwargs.get("t", args[1] if len(args) > 1 else None))
    if t is None:
        return None
    t = torch.as_tensor(t).flatten()
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise ValueError("a w8a8 model scales activations per timestep bin: call it with one timestep per batch "
                         "(as the samplers do), not a mix")
    return float(t[0])


def calibrate_activations(den, *, n: int = 16, steps: int = 25, guidance: float = 1.5, bins: int = 5, seed: int = 0,
                          layers: list[str] | None = None) -> ActivationRanges:
    """Sample n images from `den` (a quantized model's Denoiser, dequantize path; lafq.pipeline.denoise's noise
    rule, seed `seed`) and keep, per int8-activation convolution (or each of `layers`) and timestep bin, the min and
    max of its input.
    Bins split the model's timestep range [0, T] evenly; bins no calibration step fell into take the nearest
    calibrated bin's range."""
    from .pipeline import SampleSpec, denoise

    model = den.module
    # Only convolutions take static scales (int8 Linears quantize their activations per call): the default layers.
    names = layers if layers is not None else [k for k, kind in int8_layers(model).items() if kind == "conv"]
    edges = tuple(float(e) for e in torch.linspace(0, den.T, bins + 1).tolist())
    seen: dict[str, dict[int, list[float]]] = {k: {} for k in names}
    state = {"bin": 0}
    root_hook = _BinHook(edges, state)

    def layer_hook(name):
        def hook(_m, args):
            lo, hi = torch.aminmax(args[0].detach().float())
            cur = seen[name].setdefault(state["bin"], [0.0, 0.0])
            cur[0], cur[1] = min(cur[0], float(lo)), max(cur[1], float(hi))
        return hook

    handles = [model.register_forward_pre_hook(root_hook, with_kwargs=True)]
    handles += [model.get_submodule(k).register_forward_pre_hook(layer_hook(k)) for k in names]
    try:
        denoise(den, SampleSpec(n=n, steps=steps, guidance=guidance, seed=seed, batch_size=min(n, 128)))
    finally:
        for h in handles:
            h.remove()
    ranges = {}
    for k, per_bin in seen.items():
        if not per_bin:
            continue
        filled = sorted(per_bin)
        ranges[k] = torch.tensor([per_bin[min(filled, key=lambda c: abs(c - b))] for b in range(bins)],
                                 dtype=torch.float32)
    plan = getattr(model, "lafq_plan", None)
    from .evaluate import plan_digest
    return ActivationRanges(edges, ranges, {"n": n, "steps": steps, "guidance": guidance, "seed": seed,
                                            "plan": plan_digest(plan) if plan is not None else None})


class _StaticInt8Conv2d(_Int8Conv2d):
    """_Int8Conv2d with the activation scale and zero point of the current timestep bin (calibrated, static):
    no per-call min/max. Inputs outside the bin's range saturate at its ends (uint8)."""

    def __init__(self, conv: nn.Conv2d, codes: torch.Tensor, scale: torch.Tensor, ranges: torch.Tensor, state: dict):
        super().__init__(conv, codes, scale)
        lo, hi = ranges[:, 0].double(), ranges[:, 1].double()
        self.a_scale = [float(v) or 1.0 for v in ((hi - lo) / 255)]
        self.a_zero = [int(round(-float(a) / s)) for a, s in zip(lo, self.a_scale)]
        self._state = state  # shared with the model's root hook: the current timestep bin

    def forward(self, x):
        b = self._state["bin"]
        scale, zero = self.a_scale[b], self.a_zero[b]
        q = torch.quantize_per_tensor(x.float(), scale, zero, torch.quint8).int_repr()
        return torch.ops.onednn.qconv2d_pointwise(q, scale, zero, self.packed, self.w_scale, self.w_zero, self.bias,
                                                  self.stride, self.padding, self.dilation, self.groups, 1.0, 0,
                                                  torch.float32, "none", [], "")


class _BinHook:
    """The model's forward pre-hook that sets the current timestep bin for its static int8 layers. An object, not
    a closure: a deep copy of the model copies it with the state its layers share."""

    def __init__(self, edges, state: dict):
        self.probe, self.state = ActivationRanges(tuple(edges), {}), state

    def __call__(self, _module, args, kwargs):
        t = _timestep(args, kwargs)
        if t is not None:
            self.state["bin"] = self.probe.bin_of(t)


def use_w8a8(model: nn.Module, ranges: ActivationRanges, keep_float: tuple[str, ...] = ()) -> nn.Module:
    """Switch a quantized model (in place) to the "w8a8" compute mode: every int8-activation conv with a calibrated
    range runs oneDNN's int8 convolution with the static scale of the current timestep bin (set by a hook on the
    model from the timestep it is called with); int8/int4 Linears run torch.ao's int8 Linear (activations per
    call); layers in `keep_float`, and any without a range, keep float activations (the dequantize path).
    `model.lafq_activations` names each int8-capable layer's activation precision. Returns the model."""
    if getattr(model, "lafq_plan", None) is None:
        raise ValueError("W8A8 needs a quantized model: quantize it first")
    if getattr(model, "lafq_compute", "dequantize") != "dequantize":
        raise ValueError(f"the model already computes in {model.lafq_compute!r}: start from the default mode")
    if any(b.device.type != "cpu" for b in model.buffers()):
        raise ValueError("the w8a8 compute mode runs oneDNN / torch.ao CPU kernels; keep the model on the CPU")
    from .evaluate import plan_digest

    made_for = ranges.meta.get("plan")
    if made_for is not None and made_for != plan_digest(model.lafq_plan):
        raise ValueError(f"these activation ranges were calibrated on another plan ({made_for}, this model's is "
                         f"{plan_digest(model.lafq_plan)}): calibrate on this quantized model")
    capable = int8_layers(model)
    unknown = sorted(set(keep_float) - set(capable))
    if unknown:
        raise ValueError(f"keep_float names layers without int8 activations here: {', '.join(unknown[:4])}")
    state = {"bin": ranges.bins - 1}
    acts = {}
    for name, kind in capable.items():
        mod = model.get_submodule(name)
        s = mod._lafq_stored["weight"]
        if name in keep_float or (kind == "conv" and name not in ranges.ranges):
            acts[name] = "float"
            continue
        parent, attr = _owner(model, name)
        setattr(parent, attr, _StaticInt8Conv2d(mod, stored_codes(s), s.scale, ranges.ranges[name], state)
                if kind == "conv" else _dynamic_linear(mod, s))
        acts[name] = "int8"

    model.register_forward_pre_hook(_BinHook(ranges.edges, state), with_kwargs=True)
    model.lafq_compute = "w8a8"
    model.lafq_activations = acts
    model.lafq_activation_ranges = ranges.digest()  # what the static scales came from (FID cache keys name it)
    return model
