"""Quantized models of any architecture: the project's U-Net, diffusers models, any nn.Module.

`quantize(model, plan)` applies lafq.quantize's mechanism (each planned parameter replaced by its
stored form, buffers `<name>_q` / `<name>_scale`, dequantized by a forward pre-hook) and gives the
model a `Quantized<Class>` subclass of its own class, so it still is what it was (a pipeline takes a
quantized UNet2DConditionModel as its unet) and:
    .to(device) / .cuda() / .cpu()      move the stored forms with it
    .half() / .bfloat16() / .to(dtype)  set the compute dtype; the stored forms keep theirs (int8 stays
                                        int8, fp32 scales stay fp32, a bf16 weight stays bf16)
The plan is keyed by parameter name; any module that reads its weights as attributes in forward
works (Linear, Conv1d/2d/3d, Embedding, attention projections, nn.MultiheadAttention, norms).

Files (`save_quantized_model`, `load_quantized`): `.safetensors`, kind "quantized", tensors as in
lafq.quantize (`<fqn>` for float formats, `<fqn>.qdata` + `<fqn>.scale` for integer ones, plus the
model's other persistent tensors). A lafq U-Net keeps the existing format (metadata "config"); any other
model adds metadata "model": {"library", "class", "config"} and "compute_dtype". A diffusers model is
rebuilt with `<Class>.from_config(config)` (the class looked up in the diffusers namespace only); a
plain torch module needs the caller to pass an unquantized instance to load into. Loading never
re-quantizes: the stored tensors come back bit-identical.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_file, save_file
from .policy import Plan, param_shapes
from .precision import FLOAT_DTYPES, PACKED, QMAX, Stored, data_bytes, scale_shape
from .quantize import (
    _install,
    _mark_stale,
    _sync_buffers,
    quantize_,
    quantized_from_file,
    quantized_tensors,
    save_quantized,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stored_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_lafq_stored")]


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype quantized weights are dequantized to."""
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
        held = {}
        for m in _stored_modules(self):
            for attr in m._lafq_stored:
                for key in (f"{attr}_q", f"{attr}_scale"):
                    if key in m._buffers:
                        held[(m, key)] = m._buffers.pop(key)
        current = compute_dtype(self)
        probe = fn(torch.zeros(1, dtype=current))  # where float tensors go, and as which dtype
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


def _as_quantized(model: nn.Module) -> nn.Module:
    model.__class__ = _quantized_class(type(model))
    return model


def base_class(model: nn.Module) -> type:
    return getattr(type(model), "_lafq_base_class", type(model))


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def quantize(model: nn.Module, plan: Plan) -> nn.Module:
    """Quantize any model in place (names not in the plan stay as they are); returns it, in eval mode."""
    dtype = _float_dtype(model)
    quantize_(model, plan)
    _as_quantized(model)
    if dtype != torch.float32:  # a float64 (or half) model computes in its own dtype
        _set_compute_dtype(model, dtype)
    return model


def _is_lafq_unet(model: nn.Module) -> bool:
    from .model import UNet
    return issubclass(base_class(model), UNet)


def _is_diffusers(cls: type) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:
        return False
    return issubclass(cls, ModelMixin)


def model_info(model: nn.Module) -> dict:
    """What the file needs to rebuild the architecture."""
    cls = base_class(model)
    if _is_diffusers(cls):
        from .models.diffusers_models import config_dict
        return {"library": "diffusers", "class": cls.__name__, "config": config_dict(model)}
    return {"library": "torch", "class": f"{cls.__module__}.{cls.__qualname__}"}


def save_quantized_model(path: str | os.PathLike, model: nn.Module) -> int:
    """Write a quantized model atomically; returns the file size in bytes."""
    if getattr(model, "lafq_plan", None) is None:
        raise ValueError("the model is not quantized: quantize(model, plan) first")
    if _is_lafq_unet(model):
        return save_quantized(path, model)  # the shipped format, unchanged
    tensors = quantized_tensors(model)
    tensors.update({k: v for k, v in model.state_dict().items() if k not in tensors})
    plan: Plan = model.lafq_plan
    dtype = {v: k for k, v in _DTYPES.items()}[compute_dtype(model)]
    save_file(path, tensors, {"kind": "quantized", "model": model_info(model), "compute_dtype": dtype,
                              "plan": {"precisions": plan.precisions, "policy": plan.policy}})
    return Path(path).stat().st_size


def _build(info: dict, name: str) -> nn.Module:
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


def _stored_from(tensors: dict, plan: Plan, shapes: dict, name: str) -> tuple[dict, set]:
    """The stored forms the plan names, checked against the architecture's shapes (as quantized_from_file)."""
    stored = {}
    for n, p in plan.precisions.items():
        if p == "fp32":
            continue
        shape = shapes[n]
        try:
            if p in QMAX:
                s = Stored(p, shape, tensors[f"{n}.qdata"], tensors[f"{n}.scale"])
                want = (data_bytes(shape, p),) if p in PACKED else shape
                if tuple(s.data.shape) != want or tuple(s.scale.shape) != scale_shape(shape, p):
                    raise CheckpointError(f"{name}: {n} has stored shape {tuple(s.data.shape)} with scales "
                                          f"{tuple(s.scale.shape)}, expected {want} with {scale_shape(shape, p)}")
            else:
                if tensors[n].dtype != FLOAT_DTYPES[p] or tuple(tensors[n].shape) != shape:
                    raise CheckpointError(f"{name}: {n} should be {p} {shape}, is {tensors[n].dtype} {tuple(tensors[n].shape)}")
                s = Stored(p, shape, tensors[n])
        except KeyError as e:
            raise CheckpointError(f"{name}: missing tensor {e} for {n} ({p})") from None
        stored[n] = s
    return stored, {k for n, s in stored.items() for k in ((f"{n}.qdata", f"{n}.scale") if s.scale is not None else (n,))}


def load_quantized(path: str | os.PathLike, into: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Load any quantized model file; returns (model in eval mode, metadata). `into`: an unquantized
    instance of the architecture, needed only for plain torch modules."""
    from .model import to_inference_layout

    name = str(path)
    tensors, meta = load_file(path, kind="quantized")
    if "model" not in meta:  # the project's U-Net, in the shipped format
        return _as_quantized(quantized_from_file(tensors, meta, name)), meta
    model = into if into is not None else _build(meta["model"], name)
    try:
        plan = Plan(dict(meta["plan"]["precisions"]), meta["plan"].get("policy", {}))
        dtype = _DTYPES[meta.get("compute_dtype", "float32")]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: invalid quantized-model metadata ({e})") from None
    shapes = param_shapes(model)
    try:
        plan.validate(shapes)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    stored, used = _stored_from(tensors, plan, shapes, name)
    plain = {k: v for k, v in tensors.items() if k not in used}
    own = set(model.state_dict()) - set(stored)
    missing, unexpected = sorted(own - set(plain)), sorted(set(plain) - own)
    if missing or unexpected:
        raise CheckpointError(f"{name} does not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    # assign=True keeps the file's dtypes (a float64 model reloads as float64, bit for bit)
    model.load_state_dict(plain, strict=False, assign=True)
    to_inference_layout(model.eval())  # the layout quantize_ gave the original before storing
    _install(model, stored)
    model.lafq_plan = plan
    model.lafq_stored = stored
    _as_quantized(model)
    _set_compute_dtype(model, dtype)
    return model.requires_grad_(False), meta
