"""Number formats: what each precision stores, how many bytes it takes, and its round trip.

    fp32, fp16, bf16   the tensor cast to that dtype
    int8, int4         symmetric round-to-nearest per output channel (dim 0) with one fp32 scale
                       per channel; int4 values in [-7, 7] packed two per byte (low nibble first)
    int4-g32, int4-g64 the same int4 codes with one fp16 scale per group of 32 / 64 consecutive
                       weights along the input dimension (the tensor flattened to (out, in));
                       the last group of a row may be shorter. 4 + 16/G bits per weight.

Integer formats need a tensor with an output-channel axis (dim >= 2 or an embedding table);
vectors (biases, norms) take float formats only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "int4-g64", "int4-g32")
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "int4-g64": 4, "int4-g32": 4}
QMAX = {"int8": 127, "int4": 7, "int4-g64": 7, "int4-g32": 7}
GROUP = {"int4-g64": 64, "int4-g32": 32}  # group-wise formats: weights per scale along the input dimension
PACKED = ("int4", "int4-g64", "int4-g32")  # two codes per byte
SCALE_BYTES = 4  # one fp32 scale per output channel
GROUP_SCALE_BYTES = 2  # one fp16 scale per group


def check_precision(p: str) -> str:
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {p!r}; choose one of {PRECISIONS}")
    return p


def supports(shape: tuple[int, ...], precision: str) -> bool:
    """Integer formats need an output-channel axis; vectors take float formats only."""
    return precision in FLOAT_DTYPES or len(shape) >= 2


def fallback(shape: tuple[int, ...], precision: str) -> str:
    """The precision a tensor actually gets when asked for `precision` (vectors: int -> fp16)."""
    return precision if supports(shape, precision) else "fp16"


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def data_bytes(shape, precision: str) -> int:
    """numel × element size, the source's definition (int4: half a byte per value, rounded up per tensor)."""
    n = numel(shape)
    return (n + 1) // 2 if precision in PACKED else n * BITS[precision] // 8


def scale_shape(shape, precision: str) -> tuple[int, ...]:
    """Shape of the stored scales: (out,) per channel, (out, ceil(in / G)) per group, () for floats."""
    if precision in GROUP:
        return (shape[0], -(-(numel(shape) // shape[0]) // GROUP[precision]))
    return (shape[0],) if precision in QMAX else ()


def scale_bytes(shape, precision: str) -> int:
    if precision not in QMAX:
        return 0
    return numel(scale_shape(shape, precision)) * (GROUP_SCALE_BYTES if precision in GROUP else SCALE_BYTES)


def tensor_bytes(shape, precision: str) -> int:
    return data_bytes(shape, precision) + scale_bytes(shape, precision)


@dataclass
class Stored:
    """A tensor in its stored form: `data` (float dtype, int8, or packed uint8) and `scale` (see scale_shape)."""
    precision: str
    shape: tuple[int, ...]
    data: torch.Tensor
    scale: torch.Tensor | None = None


def channel_scales(w: torch.Tensor, precision: str) -> torch.Tensor:
    amax = w.detach().float().flatten(1).abs().amax(1)
    scale = amax / QMAX[precision]
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero channel: any scale works


def _grouped(w2d: torch.Tensor, g: int) -> torch.Tensor:
    """(out, in) -> (out, groups, g), zero-padded at the end of each row."""
    pad = -w2d.shape[1] % g
    return torch.nn.functional.pad(w2d, (0, pad)).reshape(w2d.shape[0], -1, g)


def group_scales(w: torch.Tensor, precision: str) -> torch.Tensor:
    """fp16 scales (out, groups). Rounded to fp16 *before* quantizing, so the codes fit the stored scale."""
    amax = _grouped(w.detach().float().flatten(1), GROUP[precision]).abs().amax(2)
    scale = (amax / QMAX[precision]).half()
    # fp16 underflow (|w| < ~4e-7) or an all-zero group: 1 is as good as any scale there.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _dequant(q: torch.Tensor, scale: torch.Tensor, shape, precision: str) -> torch.Tensor:
    """int codes (shape) × per-channel (out,) or per-group (out, groups) scales -> fp32 (shape)."""
    q2 = q.float().flatten(1)
    if precision not in GROUP:
        return (q2 * scale.float()[:, None]).reshape(shape)
    g = GROUP[precision]
    return (_grouped(q2, g) * scale.float()[:, :, None]).flatten(1)[:, :q2.shape[1]].reshape(shape)


def quantize_int(w: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric RTN: (int8 values in [-qmax, qmax], scales: fp32 per channel or fp16 per group)."""
    qmax = QMAX[precision]
    if precision in GROUP:
        scale = group_scales(w, precision)
        w2 = w.detach().float().flatten(1)
        g = GROUP[precision]
        q = torch.round(_grouped(w2, g) / scale.float()[:, :, None]).clamp(-qmax, qmax).flatten(1)[:, :w2.shape[1]]
        return q.to(torch.int8).reshape(w.shape), scale
    scale = channel_scales(w, precision)
    q = torch.round(w.detach().float().flatten(1) / scale[:, None]).clamp(-qmax, qmax)
    return q.to(torch.int8).reshape(w.shape), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] -> uint8, two per byte (element 2i in the low nibble)."""
    flat = (q.flatten().to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], 1).flatten()[:numel(shape)].to(torch.int8).reshape(shape)


def store(w: torch.Tensor, precision: str) -> Stored:
    check_precision(precision)
    shape = tuple(w.shape)
    if not supports(shape, precision):
        raise ValueError(f"{precision} needs a tensor with an output-channel axis; shape {shape} takes fp32/fp16/bf16")
    if precision in FLOAT_DTYPES:
        return Stored(precision, shape, w.detach().to(FLOAT_DTYPES[precision]).contiguous())
    q, scale = quantize_int(w, precision)
    return Stored(precision, shape, pack_int4(q) if precision in PACKED else q, scale)


def load(s: Stored, dtype=torch.float32) -> torch.Tensor:
    """Dequantize to the compute dtype."""
    if s.precision in FLOAT_DTYPES:
        return s.data.to(dtype)
    q = unpack_int4(s.data, s.shape) if s.precision in PACKED else s.data
    return _dequant(q, s.scale, s.shape, s.precision).to(dtype)


def roundtrip(w: torch.Tensor, precision: str) -> torch.Tensor:
    """w after storing in `precision` and loading back (fp32)."""
    return load(store(w, fallback(tuple(w.shape), precision)))
