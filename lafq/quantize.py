"""Quantized models of any architecture (the project's U-Net, diffusers models, any nn.Module): apply a
Plan so the model really stores low-precision weights; save, load and measure it.

`quantize(model, plan)` replaces every parameter not kept in fp32 by its stored form (buffers
`<name>_q` and `<name>_scale` on the owning module), registers a forward pre-hook that dequantizes it
to the compute dtype just before the module runs, and gives the model a `Quantized<Class>` subclass of
its own class, so it still is what it was (a pipeline takes a quantized UNet2DConditionModel as its
unet) and, by construction of that class:
    .to(device) / .cuda() / .cpu()      move the stored forms with it
    .half() / .bfloat16() / .to(dtype)  set the compute dtype; the stored forms keep theirs (int8 stays
                                        int8, fp32 scales stay fp32, a bf16 weight stays bf16)
Memory holds the small form. The plan is keyed by parameter name; any module that reads its weights as
attributes in forward works (Linear, Conv1d/2d/3d, Embedding, attention projections, norms).

Compute modes (`quantize(model, plan, compute=...)`):
    "dequantize"    (default) the pre-hook above: FP32 (or the compute dtype's) math on the dequantized
                    weights. Every shipped number uses this mode; speed work changes its outputs at most by
                    float rounding (lafq.model's CPU fast paths, pinned in tests/test_fast_path.py).
    "int8-dynamic"  CPU only, opt-in: integer kernels on the stored codes (lafq.int8).
    "w8a8"          CPU only, opt-in, set by lafq.int8.use_w8a8(model, ranges): the same int8 convolutions
                    with static activation scales per timestep bin, calibrated (calibrate_activations) and
                    stored in their own file (ActivationRanges.save, kind "activation-ranges").

One file format (`save_quantized`, `load_quantized`): `.safetensors`, kind "quantized", metadata
{"model": {"library", "class", "config"}, "compute_dtype", "plan"}; tensors: unquantized parameters and
persistent buffers under their names (in the compute dtype, or float32), float-cast parameters under
their names in their dtype, integer ones as `<name>.qdata` (int8, or uint8 with two int4 per byte) plus
`<name>.scale` (fp32 per output channel, or fp16 per group for int4-g32 / int4-g64). The architecture
is rebuilt from "model": the project U-Net from its config, a diffusers model with
`<Class>.from_config(config)` (looked up in the diffusers namespace only); a plain torch module needs the
caller to pass an unquantized instance (`into=`). Files written before this format (the U-Net's, with
metadata "config") still load. Every tensor is checked before use (`check_tensors`), and loading never
re-quantizes: the stored tensors come back bit-identical.
"""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_file, save_file
from .plan import Plan, param_shapes
from .precision import FORMATS, PRECISIONS, Stored, data_bytes, file_tensors, load, numel, scale_bytes, store


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
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stored_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_lafq_stored")]


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype quantized weights are dequantized to (an unquantized model's float dtype)."""
    mods = _stored_modules(model)
    if mods:
        return getattr(mods[0], "_lafq_dtype", torch.float32)
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    for m in _stored_modules(model):
        m._lafq_dtype = dtype
    _mark_stale(model)


class QuantizedMixin:
    """Mixed into a quantized model's class: device moves carry the stored forms, dtype casts do not touch them."""

    _lafq_base_class: type = nn.Module

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (diffusers models cast their time embeddings to `self.dtype`, which would
        otherwise be read from whatever parameter or scale comes first)."""
        return compute_dtype(self)

    def _apply(self, fn, recurse=True):
        current = compute_dtype(self)
        cpu_only = getattr(self, "lafq_compute", "dequantize") in ("int8-dynamic", "w8a8")
        try:
            probe = fn(torch.zeros(1, dtype=current))  # where float tensors go, and as which dtype
        except RuntimeError:  # e.g. .cuda() without a GPU: torch's own error, unless the model is CPU-only anyway
            if not cpu_only:
                raise
            probe = torch.empty(0, device="meta")
        if cpu_only and probe.device.type != "cpu":
            raise ValueError("the int8-dynamic compute mode runs CPU kernels; keep the model on the CPU")
        held = {}
        for m in _stored_modules(self):
            for attr in m._lafq_stored:
                for key in (f"{attr}_q", f"{attr}_scale"):
                    if key in m._buffers:
                        held[(m, key)] = m._buffers.pop(key)
        try:
            super()._apply(fn, recurse)
        finally:
            for (m, key), buf in held.items():
                m._buffers[key] = buf.to(probe.device)
        _sync_buffers(self)
        _set_compute_dtype(self, probe.dtype if probe.is_floating_point() else current)
        return self


_CLASSES: dict[type, type] = {}


def _quantized_class(cls: type) -> type:
    if issubclass(cls, QuantizedMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Quantized{cls.__name__}", (QuantizedMixin, cls),
                             {"_lafq_base_class": cls, "__module__": cls.__module__, "__qualname__": f"Quantized{cls.__name__}"})
    return _CLASSES[cls]


def base_class(model: nn.Module) -> type:
    """The class a quantized model was made from (its own class for any other model)."""
    return getattr(type(model), "_lafq_base_class", type(model))


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _finish(model: nn.Module, plan: Plan, stored: dict[str, Stored], dtype: torch.dtype) -> nn.Module:
    _install(model, stored)
    model.lafq_plan = plan
    model.lafq_stored = stored
    model.__class__ = _quantized_class(type(model))
    _set_compute_dtype(model, dtype)
    return model.eval().requires_grad_(False)


def quantize(model: nn.Module, plan: Plan, compute: str = "dequantize") -> nn.Module:
    """Quantize any model in place following `plan` (names not in the plan stay as they are); returns it,
    in eval mode. A float64 (or half) model computes in its own dtype. `compute`: one of COMPUTE_MODES."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"unknown compute mode {compute!r}; choose one of {COMPUTE_MODES}")
    if getattr(model, "lafq_plan", None) is not None:
        raise ValueError("model is already quantized; quantize a fresh copy of the FP32 model")
    from .model import to_inference_layout

    plan.validate(param_shapes(model))
    dtype = _float_dtype(model)
    to_inference_layout(model)  # the layout load_quantized builds, so a reload is bit-identical
    params = dict(model.named_parameters())
    stored = {n: store(params[n], p) for n, p in plan.precisions.items() if p != "fp32"}
    _finish(model, plan, stored, dtype)
    if compute == "int8-dynamic":
        from .int8 import use_int8_kernels
        return use_int8_kernels(model)
    return model


quantize_ = quantize  # torchao's name for the same in-place call


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

def model_info(model: nn.Module) -> dict:
    """What a file needs to rebuild the architecture: library, class and config."""
    from .model import UNet

    cls = base_class(model)
    if issubclass(cls, UNet):
        return {"library": "lafq", "class": "UNet", "config": json.loads(json.dumps(model.cfg.to_dict()))}
    try:
        from diffusers import ModelMixin
    except ImportError:
        ModelMixin = ()
    if ModelMixin and issubclass(cls, ModelMixin):
        from .models.diffusers_models import config_dict
        return {"library": "diffusers", "class": cls.__name__, "config": config_dict(model)}
    return {"library": "torch", "class": f"{cls.__module__}.{cls.__qualname__}"}


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the file holds: stored forms, the other parameters and the persistent buffers."""
    out = {}
    for name, s in model.lafq_stored.items():
        if s.scale is None:
            out[name] = s.data
        else:
            out[f"{name}.qdata"] = s.data
            out[f"{name}.scale"] = s.scale
    out.update({k: v for k, v in model.state_dict().items() if k not in out})
    return out


def save_quantized(path: str | os.PathLike, model: nn.Module) -> int:
    """Write a quantized model of any class atomically; returns the file size in bytes."""
    if getattr(model, "lafq_plan", None) is None:
        raise ValueError("the model is not quantized: quantize(model, plan) first")
    if getattr(model, "lafq_compute", "dequantize") != "dequantize":
        raise ValueError("save a model quantized with the default compute mode; switch after loading "
                         "(lafq.int8.use_int8_kernels, or use_w8a8 with its ActivationRanges file)")
    plan: Plan = model.lafq_plan
    dtype = {v: k for k, v in DTYPES.items()}[compute_dtype(model)]
    save_file(path, quantized_tensors(model), {"kind": "quantized", "model": model_info(model), "compute_dtype": dtype,
                                               "plan": {"precisions": plan.precisions, "policy": plan.policy}})
    return Path(path).stat().st_size


def expected_tensors(plan: Plan, model: nn.Module, dtype: torch.dtype) -> dict[str, tuple[tuple, tuple]]:
    """File tensor name -> (shape, allowed dtypes) for `plan` on the (unquantized) architecture `model`."""
    floats = (dtype,) if dtype == torch.float32 else (dtype, torch.float32)
    out = {}
    for n, shape in param_shapes(model).items():
        p = plan.precisions.get(n, "fp32")
        for k, (sh, dt) in file_tensors(n, shape, p).items():
            out[k] = (sh, floats if p == "fp32" else (dt,))
    params = set(param_shapes(model))
    for k, v in model.state_dict().items():
        if k not in params:  # persistent buffers
            out[k] = (tuple(v.shape), floats if v.is_floating_point() else (v.dtype,))
    return out


def check_tensors(tensors: dict, plan: Plan, model: nn.Module, dtype: torch.dtype, name: str) -> None:
    """The file's tensors are exactly those `plan` implies for `model` (no more, no fewer), with their shapes,
    dtypes, finite values and positive scales; raises CheckpointError naming the first problem."""
    want = expected_tensors(plan, model, dtype)
    scales = {f"{n}.scale" for n, p in plan.precisions.items() if FORMATS[p].kind == "scaled"}
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
        if t.is_floating_point() and not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()):
            raise CheckpointError(f"{name}: {k} holds NaN or infinite values")
        if k in scales and bool((t <= 0).any()):
            raise CheckpointError(f"{name}: {k} holds scales <= 0")


def _build(info: dict, name: str) -> nn.Module:
    if info.get("library") == "lafq":
        from .model import UNet, UNetConfig
        try:
            return UNet(UNetConfig.from_dict(info["config"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{name}: invalid quantized-model metadata ({str(e)[:160]})") from None
    if info.get("library") != "diffusers":
        raise CheckpointError(f"{name} holds a quantized {info.get('class')!r}; pass an unquantized instance to "
                              f"load into: load_quantized(path, into=model)")
    try:
        import diffusers
    except ImportError:
        raise CheckpointError(f"{name} holds a diffusers {info.get('class')}; install diffusers to load it") from None
    cls = getattr(diffusers, str(info.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise CheckpointError(f"{name}: {info.get('class')!r} is not a diffusers model class")
    try:
        return cls.from_config(info["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: cannot build {cls.__name__} from its config ({e})") from None


def file_model(meta: dict) -> dict:
    """The "model" entry of a quantized file's metadata (a U-Net file in the earlier format has "config")."""
    if isinstance(meta.get("model"), dict):
        return meta["model"]
    if "config" in meta:
        return {"library": "lafq", "class": "UNet", "config": meta["config"]}
    return {}


def quantized_from_file(tensors: dict, meta: dict, name: str, into: nn.Module | None = None,
                        like: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model from file contents without re-quantizing (bit-identical reload).
    `into`: an unquantized instance to load into (needed for plain torch modules); `like`: a model whose
    architecture the file must have (another network's file is refused, naming the difference)."""
    from .model import to_inference_layout
    from .planfile import plan_from_dict

    info = file_model(meta)
    try:
        plan = plan_from_dict(meta["plan"], "quantized model's plan")
        dtype = DTYPES[meta.get("compute_dtype", "float32")]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: invalid quantized-model metadata ({str(e)[:160]})") from None
    if like is not None:
        want = model_info(like)
        if (want.get("class"), want.get("config")) != (info.get("class"), json.loads(json.dumps(info.get("config")))):
            from .checkpoint import config_mismatch
            diff = (config_mismatch(want.get("config") or {}, info.get("config") or {})
                    if want.get("class") == info.get("class") else [f"a {info.get('class')}, not a {want.get('class')}"])
            raise CheckpointError(f"{name} is another network: " + "; ".join(diff[:3]))
    model = into if into is not None else _build(info, name)
    try:
        plan.validate(param_shapes(model))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    check_tensors(tensors, plan, model, dtype, name)
    shapes = param_shapes(model)
    stored = {}
    for n, p in plan.precisions.items():
        if FORMATS[p].kind == "scaled":
            stored[n] = Stored(p, shapes[n], tensors[f"{n}.qdata"], tensors[f"{n}.scale"])
        elif p != "fp32":
            stored[n] = Stored(p, shapes[n], tensors[n])
    used = {k for n, s in stored.items() for k in ((f"{n}.qdata", f"{n}.scale") if s.scale is not None else (n,))}
    plain = {k: v for k, v in tensors.items() if k not in used}
    # assign=True keeps the file's dtypes (a float64 model reloads as float64, bit for bit)
    model.load_state_dict(plain, strict=False, assign=True)
    to_inference_layout(model.eval())  # the layout quantize gave the original before storing
    return _finish(model, plan, stored, dtype)


def load_quantized(path: str | os.PathLike, into: nn.Module | None = None,
                   like: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Load any quantized model file; returns (model in eval mode, metadata). See `quantized_from_file`."""
    tensors, meta = load_file(path, kind="quantized")
    return quantized_from_file(tensors, meta, str(path), into=into, like=like), meta
