"""Class-conditional U-Net for 28x28 images, in the shape of the source research.

Top-level modules are the *layers* that Fisher maps, plans and plots are keyed by:

    embed                      sinusoidal time embedding MLP + class embedding (with a null class)
    stem                       3x3 conv, image -> base channels
    down1, down2, down3        28x28, 14x14, 7x7 (attention at 7x7)
    mid                        res -> attention -> res at 7x7
    up3, up2, up1              7x7, 14x14, 28x28, each takes the skip of its down twin
    head                       GroupNorm, SiLU, 3x3 conv back to the image

A parameter's layer is the first component of its fully qualified name
(`down2.res.0.conv1.weight` belongs to `down2`), see `layer_of`.

Inference fast path: with gradients off (`torch.inference_mode` / `no_grad`), blocks apply SiLU and
the residual / embedding adds in place on tensors they created themselves. The outputs are
bit-identical to the out-of-place path (the same kernels in the same order; a + b == b + a in IEEE
float), which is what training and the per-sample-gradient hooks run. Forward hooks on the top-level
layers (lafq.inside) see the same tensors either way: a layer's output is never modified afterwards.

Two more inference fast paths, on the CPU, with gradients off and no hooks but lafq's own dequantize
hooks on the modules they touch (`fast_inference`); they compute the same function, equal to float
rounding (max |Δ| 1.9e-6 on outputs up to 7.2 at batch 128; lafq.quantize's int8-dynamic mode quantizes
each chunk's activations on their own), and guided sampling on 2 cores runs 1.16-1.25x faster with both
(interleaved runs, docs/benchmark-runs.md "CPU fast paths"):
- `upsample_conv`: nearest 2x upsampling then a 3x3 conv equals a stride-2 transposed conv of the
  low-resolution input with a 4x4 kernel of summed taps: 16 taps per input pixel instead of 36.
- The 28x28 tail (the up1 concatenation, up1, head) runs in batch chunks of at most `CHUNK_BYTES` per
  concatenation: glibc's malloc serves blocks above 32 MiB (its largest mmap threshold) with fresh pages
  on every allocation, so at batch 128 the 38.5 MB concatenation and its GroupNorm cost page faults
  (20 of 200 ms per step, self CPU time), which heap-sized chunks do not.
`FAST_INFERENCE = False` turns both off (tests and benchmarks compare the two).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

LAYERS = ("embed", "stem", "down1", "down2", "down3", "mid", "up3", "up2", "up1", "head")


def layer_of(param_name: str) -> str:
    """The layer (top-level module) a fully qualified parameter name belongs to."""
    return param_name.split(".", 1)[0]


@dataclass(frozen=True)
class UNetConfig:
    image_channels: int = 1
    image_size: int = 28
    base_channels: int = 32
    channel_mults: tuple[int, int, int] = (1, 2, 2)  # down1, down2, down3
    res_blocks: int = 1  # residual blocks per down layer (up layers get the same)
    attn_heads: int = 4
    attn_layers: tuple[str, ...] = ("down3", "mid", "up3")
    dropout: float = 0.1
    num_classes: int = 10  # index num_classes is the learned null class
    groups: int = 8

    def __post_init__(self):
        if len(self.channel_mults) != 3:
            raise ValueError(f"channel_mults needs 3 entries (down1..down3), got {self.channel_mults}")
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two 2x downsamplings), got {self.image_size}")
        for ch in self.channels:
            if ch % self.groups or ch % self.attn_heads:
                raise ValueError(f"channel count {ch} must be divisible by groups={self.groups} and attn_heads={self.attn_heads}")
        unknown = set(self.attn_layers) - {"down1", "down2", "down3", "mid", "up1", "up2", "up3"}
        if unknown:
            raise ValueError(f"attn_layers has unknown layers {sorted(unknown)}")

    @property
    def channels(self) -> tuple[int, int, int]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def embed_dim(self) -> int:
        return 4 * self.base_channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; known: {sorted(known)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Embedding(nn.Module):
    """Time MLP plus class embedding; computed once per forward and shared by every block."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        d = cfg.embed_dim
        self.freq_dim = cfg.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(self.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None

    def forward(self, t, y, dtype: torch.dtype = torch.float32):
        # In the input's dtype, not the weight's: a quantized layer's weight only takes its compute
        # dtype inside its own forward (fp16 compute on a GPU failed on a float32 embedding).
        emb = self.time_mlp(timestep_embedding(t, self.freq_dim).to(dtype))
        if self.class_emb is not None:
            emb = emb + self.class_emb(y)
        return F.silu(emb)  # every block's projection starts from the activated embedding


FAST_INFERENCE = True
CHUNK_BYTES = 24 * 2**20  # below glibc's 32 MiB mmap ceiling, with room for the allocator's headers


def _foreign_hooks(module: nn.Module) -> bool:
    """Whether any module in the subtree has hooks other than lafq's dequantize pre-hooks (which only set
    weights and may run more than once per forward), or global module hooks are set: a fast path that
    calls modules in chunks, or bypasses them, would change what such hooks see."""
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks:
        return True
    for m in module.modules():
        if m._forward_hooks or m._backward_hooks or m._backward_pre_hooks or m._forward_hooks_with_kwargs:
            return True
        if any(not getattr(h, "lafq_weight_hook", False) for h in m._forward_pre_hooks.values()):
            return True
    return False


def fast_inference(x: torch.Tensor, *modules: nn.Module) -> bool:
    """The CPU inference fast paths apply (module docstring): no autograd, CPU, no foreign hooks."""
    return (FAST_INFERENCE and not torch.is_grad_enabled() and x.device.type == "cpu"
            and not any(_foreign_hooks(m) for m in modules))


# Nearest 2x upsampling then a 3x3 conv (pad 1): output row 2i reads low-resolution rows (i-1, i, i) through
# the kernel's rows (0, 1, 2), output row 2i+1 reads (i, i+1, i+1) through... (0, 1, 2) on rows (i, i, i+1).
# A stride-2 transposed conv with a 4x4 kernel (pad 1) sends input row m to output rows 2m-1..2m+2 through
# its kernel rows 0..3, so kernel row 3 = w0 and row 1 = w1 + w2 (even outputs), row 2 = w0 + w1 and
# row 0 = w2 (odd outputs); likewise for columns.
_TRANSPOSED_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def _upsample_conv2x(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(pad 1)(upsample_nearest_2x(x)) as one stride-2 transposed conv with a 4x4 kernel of summed
    taps: 16 multiply-adds per input pixel and channel pair instead of 36, and no upsampled input."""
    # The taps are summed in float32 (in bf16 the sums would round once more than the plain path does).
    taps = _TRANSPOSED_TAPS.to(weight.device)
    kernel = torch.einsum("kh,oihw,lw->iokl", taps, weight.float(), taps).to(weight.dtype)  # (in, out, kh, kw)
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    kernel = kernel.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)


def upsample_conv(resample: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`resample(x)` for an up level's Sequential(Upsample(2, nearest), Conv2d(3x3, pad 1)), through
    `_upsample_conv2x` where the fast path applies (the conv's dequantize hook, if any, runs first)."""
    up, conv = resample[0], resample[1]
    if not (fast_inference(x, resample) and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and up.mode == "nearest" and up.scale_factor in (2, (2, 2))):
        return resample(x)
    for hook in conv._forward_pre_hooks.values():  # lafq's dequantize hooks only (fast_inference checked)
        hook(conv, (x,))
    return _upsample_conv2x(x, conv.weight, conv.bias)


def _inplace() -> bool:
    """In-place activations and adds are safe only without autograd: its saved tensors must not change.
    They skip one allocation and one memory pass per op: 8-10% of eager sampling time on 2 cores
    (interleaved A/B runs, docs/benchmark-runs.md "Speed work"), where GroupNorm, SiLU, adds and cats are a third of a step."""
    return not torch.is_grad_enabled()


class SiLU(nn.SiLU):
    """nn.SiLU, in place when gradients are off (the head's; no parameters, so state dicts are unchanged)."""

    def forward(self, x):
        return F.silu(x, inplace=self.inplace or _inplace())


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        if _inplace():  # same values, bit for bit; see the module docstring
            h = self.conv1(F.silu(self.norm1(x), inplace=True))
            h += self.emb_proj(emb)[:, :, None, None]
            h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
            h += self.skip(x)
            return h
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three n d) h w -> three b n (h w) d", three=3, n=self.heads)
        out = self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b n (h w) d -> b (n d) h w", h=h, w=w))
        if _inplace():
            out += x
            return out
        return x + out


class Level(nn.Module):
    """Residual blocks, optional attention, optional resampling: one of down1..3 / up1..3."""

    def __init__(self, cins: list[int], cout: int, cfg: UNetConfig, attn: bool, resample: str | None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, cout, cfg.embed_dim, cfg.groups, cfg.dropout) for c in cins)
        self.attn = Attention(cout, cfg.attn_heads, cfg.groups) if attn else None
        if resample == "down":
            self.resample = nn.Conv2d(cout, cout, 3, stride=2, padding=1)
        elif resample == "up":
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cout, cout, 3, padding=1))
        else:
            self.resample = None

    def forward(self, x, emb):
        """Features at this level's resolution; the U-Net applies `resample` itself, so hooks on a level
        see its features (and down levels hand the same tensor to their skip connection)."""
        for block in self.res:
            x = block(x, emb)
        return self.attn(x) if self.attn is not None else x


class Mid(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.res1 = ResBlock(ch, ch, cfg.embed_dim, cfg.groups, cfg.dropout)
        self.attn = Attention(ch, cfg.attn_heads, cfg.groups) if "mid" in cfg.attn_layers else None
        self.res2 = ResBlock(ch, ch, cfg.embed_dim, cfg.groups, cfg.dropout)

    def forward(self, x, emb):
        x = self.res1(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x, emb)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        c1, c2, c3 = cfg.channels
        n = cfg.res_blocks
        a = set(cfg.attn_layers)
        self.embed = Embedding(cfg)
        self.stem = nn.Conv2d(cfg.image_channels, c1, 3, padding=1)
        self.down1 = Level([c1] + [c1] * (n - 1), c1, cfg, "down1" in a, "down")
        self.down2 = Level([c1] + [c2] * (n - 1), c2, cfg, "down2" in a, "down")
        self.down3 = Level([c2] + [c3] * (n - 1), c3, cfg, "down3" in a, None)
        self.mid = Mid(c3, cfg)
        # Each up layer concatenates the skip of its down twin to its first block's input.
        self.up3 = Level([c3 + c3] + [c3] * (n - 1), c3, cfg, "up3" in a, "up")
        self.up2 = Level([c3 + c2] + [c2] * (n - 1), c2, cfg, "up2" in a, "up")
        self.up1 = Level([c2 + c1] + [c1] * (n - 1), c1, cfg, "up1" in a, None)
        self.head = nn.Sequential(nn.GroupNorm(cfg.groups, c1), SiLU(), nn.Conv2d(c1, cfg.image_channels, 3, padding=1))

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise in x at integer timesteps t for class labels y (None: unconditional)."""
        if y is None:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        emb = self.embed(t, y, x.dtype)
        h = self.stem(x)
        s1 = self.down1(h, emb)
        s2 = self.down2(self.down1.resample(s1), emb)
        s3 = self.down3(self.down2.resample(s2), emb)
        h = self.mid(s3, emb)
        h = upsample_conv(self.up3.resample, self.up3(torch.cat([h, s3], 1), emb))
        h = upsample_conv(self.up2.resample, self.up2(torch.cat([h, s2], 1), emb))
        return self._tail(h, s1, emb)

    def _tail(self, h, s1, emb):
        """head(up1(cat(h, s1))): in batch chunks of at most CHUNK_BYTES of concatenation where the fast
        path applies (module docstring); per-sample ops only, so chunks give the same result. (In the
        int8-dynamic compute mode of lafq.quantize, activation scales span the tensor, so each chunk gets
        its own: outputs then move by int8 error, as they do with the batch size.)"""
        n, c = h.shape[0], h.shape[1] + s1.shape[1]
        nbytes = n * c * h.shape[2] * h.shape[3] * h.element_size()
        if nbytes <= CHUNK_BYTES or not fast_inference(h, self.up1, self.head):
            return self.head(self.up1(torch.cat([h, s1], 1), emb))
        size = math.ceil(n / math.ceil(nbytes / CHUNK_BYTES))
        emb = emb.expand(n, -1)  # a batch-1 embedding broadcasts in the plain path
        return torch.cat([self.head(self.up1(torch.cat([a, b], 1), e))
                          for a, b, e in zip(h.split(size), s1.split(size), emb.split(size), strict=True)])


def to_inference_layout(model: nn.Module) -> nn.Module:
    """Channels-last conv weights, in place: oneDNN's fast layout on CPU (1.4x the sampling throughput
    measured on 2 cores, docs/benchmark-runs.md). Outputs equal the default layout's to float rounding."""
    return model.to(memory_format=torch.channels_last)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
