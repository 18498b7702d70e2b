"""Number formats: what each precision stores, how many bytes it takes, and its round trip.

    fp32, fp16, bf16   the tensor cast to that dtype
    int8, int4         symmetric round-to-nearest per output channel (dim 0) with one fp32 scale
                       per channel; int4 values in [-7, 7] packed two per byte (low nibble first)
    int4-g32, int4-g64 the same int4 codes with one fp16 scale per group of 32 / 64 consecutive
                       weights along the input dimension (the tensor flattened to (out, in));
                       the last group of a row may be shorter. 4 + 16/G bits per weight.
    fp8                float8 e4m3 (finite, max 448) times one fp32 scale per output channel (amax / 448):
                       torchao's Float8WeightOnlyConfig per-row layout

A precision is one `Format` in the registry (`register`); everything that lists precisions reads it.
Scaled (integer and fp8) formats need a tensor with an output-channel axis (dim >= 2 or an embedding table);
vectors (biases, norms) take float formats only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class Format:
    """One precision: how a weight is stored, what it costs, and how it reads back.

    kind "float": the tensor cast to `dtype` (vectors may take it). "scaled": codes of `dtype` (`qmax` the
    largest code; `packed`: two 4-bit codes per uint8) times a scale per output channel (`group` None, fp32)
    or per `group` consecutive weights along the input dimension (fp16); needs an output-channel axis.
    `codes` rounds w / scale to the stored codes (integers: round to nearest, clamped; fp8: the cast).
    """
    name: str
    bits: int  # per stored weight (scales counted apart)
    kind: str  # "float" or "scaled"
    dtype: torch.dtype  # float: the cast; scaled: the codes' dtype in memory and on file (uint8 when packed)
    qmax: float | None = None
    group: int | None = None
    packed: bool = False

    def __post_init__(self):
        if self.kind not in ("float", "scaled"):
            raise ValueError(f"format kind must be 'float' or 'scaled', got {self.kind!r}")
        if (self.kind == "scaled") != (self.qmax is not None):
            raise ValueError(f"{self.name}: a scaled format needs qmax, a float format none")

    @property
    def scale_dtype(self) -> torch.dtype | None:
        if self.kind == "float":
            return None
        return torch.float16 if self.group else torch.float32

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """w / scale (float32) -> the stored codes (before packing)."""
        if self.dtype.is_floating_point:
            return x.clamp(-self.qmax, self.qmax).to(self.dtype)
        return torch.round(x).clamp(-self.qmax, self.qmax).to(torch.int8)


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add a precision. The formats are registered here, in this module, so every plan, file, size, policy, CLI
    choice and app control that lists precisions sees them (lafq.export maps them to other libraries' configs);
    a format registered later reaches this module's functions, not the lists other modules copied at import."""
    if fmt.name in FORMATS:
        raise ValueError(f"precision {fmt.name!r} is registered already")
    FORMATS[fmt.name] = fmt
    _refresh()
    return fmt


def _refresh() -> None:
    global PRECISIONS, FLOAT_DTYPES, BITS, QMAX, GROUP, PACKED
    PRECISIONS = tuple(FORMATS)
    FLOAT_DTYPES = {n: f.dtype for n, f in FORMATS.items() if f.kind == "float"}
    BITS = {n: f.bits for n, f in FORMATS.items()}
    QMAX = {n: f.qmax for n, f in FORMATS.items() if f.kind == "scaled"}
    GROUP = {n: f.group for n, f in FORMATS.items() if f.group}
    PACKED = tuple(n for n, f in FORMATS.items() if f.packed)


for _f in (Format("fp32", 32, "float", torch.float32), Format("fp16", 16, "float", torch.float16),
           Format("bf16", 16, "float", torch.bfloat16), Format("int8", 8, "scaled", torch.int8, qmax=127),
           Format("int4", 4, "scaled", torch.uint8, qmax=7, packed=True),
           Format("int4-g64", 4, "scaled", torch.uint8, qmax=7, group=64, packed=True),
           Format("int4-g32", 4, "scaled", torch.uint8, qmax=7, group=32, packed=True)):
    register(_f)
register(Format("fp8", 8, "scaled", torch.float8_e4m3fn, qmax=448.0))
SCALE_BYTES = 4  # one fp32 scale per output channel
GROUP_SCALE_BYTES = 2  # one fp16 scale per group


def check_precision(p: str) -> str:
    if p not in FORMATS:
        raise ValueError(f"unknown precision {p!r}; choose one of {PRECISIONS}")
    return p


def supports(shape: tuple[int, ...], precision: str) -> bool:
    """Scaled formats need an output-channel axis; vectors take float formats only."""
    return FORMATS[precision].kind == "float" or len(shape) >= 2


def fallback(shape: tuple[int, ...], precision: str) -> str:
    """The precision a tensor actually gets when asked for `precision` (vectors: scaled -> fp16)."""
    return precision if supports(shape, precision) else "fp16"


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def data_bytes(shape, precision: str) -> int:
    """numel × element size, the source's definition (int4: half a byte per value, rounded up per tensor)."""
    n = numel(shape)
    return (n + 1) // 2 if FORMATS[precision].packed else n * FORMATS[precision].bits // 8


def data_shape(shape, precision: str) -> tuple[int, ...]:
    """Shape of the stored data: the tensor's own, or (bytes,) when two codes share a byte."""
    return (data_bytes(shape, precision),) if FORMATS[precision].packed else tuple(shape)


def scale_shape(shape, precision: str) -> tuple[int, ...]:
    """Shape of the stored scales: (out,) per channel, (out, ceil(in / G)) per group, () for floats."""
    f = FORMATS[precision]
    if f.group:
        return (shape[0], -(-(numel(shape) // shape[0]) // f.group))
    return (shape[0],) if f.kind == "scaled" else ()


def scale_bytes(shape, precision: str) -> int:
    f = FORMATS[precision]
    if f.kind != "scaled":
        return 0
    return numel(scale_shape(shape, precision)) * (GROUP_SCALE_BYTES if f.group else SCALE_BYTES)


def tensor_bytes(shape, precision: str) -> int:
    return data_bytes(shape, precision) + scale_bytes(shape, precision)


def file_tensors(name: str, shape, precision: str) -> dict[str, tuple[tuple, torch.dtype]]:
    """What a quantized-model file holds for one weight: {file tensor name: (shape, dtype)}."""
    f = FORMATS[precision]
    if f.kind == "float":
        return {name: (tuple(shape), f.dtype)}
    return {f"{name}.qdata": (data_shape(shape, precision), f.dtype),
            f"{name}.scale": (scale_shape(shape, precision), f.scale_dtype)}


@dataclass
class Stored:
    """A tensor in its stored form: `data` (float dtype, codes, or packed uint8) and `scale` (see scale_shape)."""
    precision: str
    shape: tuple[int, ...]
    data: torch.Tensor
    scale: torch.Tensor | None = None


def channel_scales(w: torch.Tensor, precision: str) -> torch.Tensor:
    amax = w.detach().float().flatten(1).abs().amax(1)
    scale = amax / FORMATS[precision].qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero channel: any scale works


def _grouped(w2d: torch.Tensor, g: int) -> torch.Tensor:
    """(out, in) -> (out, groups, g), zero-padded at the end of each row."""
    pad = -w2d.shape[1] % g
    return torch.nn.functional.pad(w2d, (0, pad)).reshape(w2d.shape[0], -1, g)


def group_scales(w: torch.Tensor, precision: str) -> torch.Tensor:
    """fp16 scales (out, groups). Rounded to fp16 *before* quantizing, so the codes fit the stored scale."""
    f = FORMATS[precision]
    amax = _grouped(w.detach().float().flatten(1), f.group).abs().amax(2)
    scale = (amax / f.qmax).half()
    # fp16 underflow (|w| < ~4e-7) or an all-zero group: 1 is as good as any scale there.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _dequant(q: torch.Tensor, scale: torch.Tensor, shape, precision: str) -> torch.Tensor:
    """codes (shape) × per-channel (out,) or per-group (out, groups) scales -> fp32 (shape)."""
    q2 = q.float().flatten(1)
    g = FORMATS[precision].group
    if not g:
        return (q2 * scale.float()[:, None]).reshape(shape)
    return (_grouped(q2, g) * scale.float()[:, :, None]).flatten(1)[:, :q2.shape[1]].reshape(shape)


def quantize_int(w: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round to the format's codes (int8 values in [-qmax, qmax], or fp8), with scales: fp32 per
    channel or fp16 per group."""
    f = FORMATS[precision]
    if f.group:
        scale = group_scales(w, precision)
        w2 = w.detach().float().flatten(1)
        q = f.codes(_grouped(w2, f.group) / scale.float()[:, :, None]).flatten(1)[:, :w2.shape[1]]
        return q.reshape(w.shape), scale
    scale = channel_scales(w, precision)
    return f.codes(w.detach().float().flatten(1) / scale[:, None]).reshape(w.shape), scale


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
    f = FORMATS[precision]
    shape = tuple(w.shape)
    if not supports(shape, precision):
        raise ValueError(f"{precision} needs a tensor with an output-channel axis; shape {shape} takes "
                         f"{'/'.join(FLOAT_DTYPES)}")
    if f.kind == "float":
        return Stored(precision, shape, w.detach().to(f.dtype).contiguous())
    q, scale = quantize_int(w, precision)
    return Stored(precision, shape, pack_int4(q) if f.packed else q, scale)


def codes(s: Stored) -> torch.Tensor:
    """A scaled tensor's codes in its own shape (int4 unpacked)."""
    return unpack_int4(s.data, s.shape) if FORMATS[s.precision].packed else s.data


def load(s: Stored, dtype=torch.float32) -> torch.Tensor:
    """Dequantize to the compute dtype."""
    if FORMATS[s.precision].kind == "float":
        return s.data.to(dtype)
    return _dequant(codes(s), s.scale, s.shape, s.precision).to(dtype)


def roundtrip(w: torch.Tensor, precision: str) -> torch.Tensor:
    """w after storing in `precision` and loading back (fp32)."""
    return load(store(w, fallback(tuple(w.shape), precision)))
