"""The opt-in "int8-dynamic" compute mode of a quantized model: integer kernels on the stored codes.

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
"""
from __future__ import annotations

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
    from torch.ao.nn.quantized import dynamic as nnqd

    if getattr(model, "lafq_plan", None) is None:
        raise ValueError("int8 kernels need a quantized model: quantize it first")
    if getattr(model, "lafq_compute", "dequantize") == "int8-dynamic":
        return model
    if any(b.device.type != "cpu" for b in model.buffers()):
        raise ValueError("the int8-dynamic compute mode runs torch.ao CPU kernels; keep the model on the CPU")
    for name, mod in list(model.named_modules()):
        s = getattr(mod, "_lafq_stored", {}).get("weight")
        if s is None or s.precision not in ("int8", "int4"):
            continue
        codes = stored_codes(s)
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
