"""A plan in the form other quantization libraries load: torchao, diffusers, optimum-quanto.

Libraries quantize modules, a plan names parameters: a module follows the precision of its `weight`
(biases stay in the model's float dtype in every library). What each target covers:

    torchao     `FqnToConfig` keyed by module FQN, for nn.Linear modules: the ones torchao's weight-only
                kernels are written for and the only ones diffusers' torchao loader converts (torchao
                itself would wrap a Conv2d or Embedding named in the map, without a kernel for it);
                unplanned modules are left out (no `_default`, so nothing else is touched).
                    int8                -> Int8WeightOnlyConfig()   (symmetric, per output channel: as lafq)
                    int4, int4-g32/-g64 -> IntxWeightOnlyConfig(torch.int4, PerAxis(0) / PerGroup(32|64))
                                           (runs on CPU and GPU; int4 codes held unpacked in int8)
                  or, with int4_kernel="tinygemm" (GPU, bfloat16 models only: the CPU has no kernel for it in
                  torchao 0.18), Int4WeightOnlyConfig(group_size 32 | 64, per-channel int4 -> 128) in the
                  tile-packed layout.
                    fp8                 -> Float8WeightOnlyConfig()  (e4m3, one scale per row: as lafq)
    diffusers   `TorchAoConfig(quant_type=<the FqnToConfig>, modules_to_not_convert=[...])` for
                `<Model>.from_pretrained(..., quantization_config=...)`, and the same inside a
                `PipelineQuantizationConfig(quant_mapping={component: ...})` for a pipeline.
    quanto      optimum-quanto calls `quantize(model, weights=qint8|qint4, include=[...], exclude=[...])`
                then `freeze(model)`, over nn.Linear and nn.Conv2d modules (quanto's QLinear / QConv2d).
                qint4 picks its own group size (128, 96, 64 or 32 dividing the input size; per channel
                when there are at most 128 inputs): int4-g32/-g64 are approximated by it. fp8 -> qfloat8.

Not converted anywhere, and listed in the file with the reason: fp32 modules (by plan), fp16/bf16
modules (weight-only integer libraries have no float-cast config: they stay in the model's dtype),
and module types a library does not quantize (e.g. Conv2d and Embedding for torchao). Group sizes
that do not divide a layer's input size fall back to per-channel int4 (listed as approximations).

The file: JSON {"format": 1, "kind": "lafq-export", "target", "library", "config", "modules", "approximations"}
with "config" in the library's own serialization (torchao `config_to_dict`, diffusers `to_dict`).
`load_export(path)` gives back the real library object; `apply_quanto(model, spec)` runs the quanto calls.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .checkpoint import atomic_write_bytes
from .policy import Plan
from .precision import FORMATS, GROUP, tensor_bytes

TARGETS = ("torchao", "diffusers", "quanto")
INT4_KERNELS = ("intx", "tinygemm")
QUANTO_WEIGHTS = {"int8": "qint8", "fp8": "qfloat8"}  # every other scaled format: qint4


def _exported(p: str) -> bool:
    """Weight-only libraries convert the scaled formats (integer codes, fp8); float casts stay in the model's dtype."""
    return FORMATS[p].kind == "scaled"
TINYGEMM_GROUPS = (32, 64, 128, 256)


class ExportError(ValueError):
    """The plan cannot be exported as asked (a missing library, an unknown target)."""


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"exporting this needs {package}: pip install -r requirements-export.txt") from None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Export:
    """One export: the library config (as the library's object), and which modules got what."""
    target: str
    config: object  # FqnToConfig, TorchAoConfig, or the quanto call list
    converted: dict[str, str]  # module FQN -> lafq precision it carries
    not_converted: dict[str, str]  # module FQN -> why not
    approximations: list[str] = field(default_factory=list)
    component: str = "unet"  # diffusers: the pipeline component the config is for

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ExportError(f"unknown export target {self.target!r}; choose one of {TARGETS}")

    def to_dict(self) -> dict:
        lib = {"torchao": "torchao", "diffusers": "diffusers", "quanto": "optimum-quanto"}[self.target]
        if self.target == "torchao":
            from torchao.core.config import config_to_dict
            cfg = config_to_dict(self.config)
        elif self.target == "diffusers":
            cfg = {"component": self.component, "quantization_config": self.config.to_dict()}
        else:
            cfg = {"calls": self.config}
        return {"format": 1, "kind": "lafq-export", "target": self.target,
                "library": {"name": lib, "version": _version(lib), "torchao": _version("torchao")}, "config": cfg,
                "modules": {"converted": self.converted, "not_converted": self.not_converted},
                "approximations": self.approximations}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n").encode())


def stored_bytes(model: nn.Module, converted: dict[str, str]) -> int:
    """About what the target library stores: each converted module's weight at its precision (scales included),
    every other parameter in the model's own dtype. torchao converts nn.Linear only, so on a convolutional
    U-Net this is far above the plan's size: the convolutions stay in FP32."""
    planned = {f"{m}.weight" if m else "weight": p for m, p in converted.items()}
    return sum(tensor_bytes(tuple(t.shape), planned[n]) if n in planned else t.numel() * t.element_size()
               for n, t in model.named_parameters())


def module_precisions(plan: Plan, model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Every module that owns a `weight`: its FQN -> (the weight's planned precision, the module)."""
    shapes = {n for n, _ in model.named_parameters()}
    plan.validate({n: tuple(p.shape) for n, p in model.named_parameters()})
    out = {}
    for name, mod in model.named_modules():
        w = f"{name}.weight" if name else "weight"
        if w in shapes and isinstance(mod._parameters.get("weight"), nn.Parameter):
            out[name] = (plan.precisions.get(w, "fp32"), mod)
    return out


def _float_reason(p: str) -> str:
    return "fp32 in the plan" if p == "fp32" else f"{p} in the plan: integer weight-only libraries keep it in the model's dtype"


def _torchao_configs(plan: Plan, model: nn.Module, int4_kernel: str):
    q = _require("torchao.quantization", "torchao")
    from torchao.quantization.granularity import PerAxis, PerGroup

    if int4_kernel not in INT4_KERNELS:
        raise ExportError(f"unknown int4 kernel {int4_kernel!r}; choose one of {INT4_KERNELS}")
    import torch

    configs, converted, skipped, approx = {}, {}, {}, []
    for name, (p, mod) in module_precisions(plan, model).items():
        if not _exported(p):
            skipped[name] = _float_reason(p)
            continue
        if not isinstance(mod, nn.Linear):
            skipped[name] = f"{p} in the plan; torchao's weight-only configs convert nn.Linear, not {type(mod).__name__}"
            continue
        fan_in = mod.in_features
        if p == "int8":
            configs[name] = q.Int8WeightOnlyConfig()
        elif FORMATS[p].dtype == torch.float8_e4m3fn:
            configs[name] = q.Float8WeightOnlyConfig(weight_dtype=torch.float8_e4m3fn)
        elif int4_kernel == "intx":
            g = GROUP.get(p)
            if g and fan_in % g:
                approx.append(f"{name}: {p} but {fan_in} inputs are not a multiple of {g}: per-channel int4")
                g = None
            configs[name] = q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g) if g else PerAxis(0))
        else:
            g = GROUP.get(p, 128)
            if p == "int4":
                approx.append(f"{name}: per-channel int4 has no tinygemm layout: group size 128")
            if fan_in % g:
                skipped[name] = f"{p}: tinygemm needs the input size ({fan_in}) to be a multiple of the group size {g}"
                continue
            configs[name] = q.Int4WeightOnlyConfig(group_size=g, int4_packing_format="tile_packed_to_4d")
        converted[name] = p
    return q.FqnToConfig(configs), converted, skipped, approx


def export_plan(plan: Plan, model: nn.Module, target: str, *, component: str = "unet", int4_kernel: str = "intx") -> Export:
    """The plan as `target` loads it, for this architecture (the module types decide what converts)."""
    if target in ("torchao", "diffusers"):
        cfg, converted, skipped, approx = _torchao_configs(plan, model, int4_kernel)
        if target == "torchao":
            return Export("torchao", cfg, converted, skipped, approx)
        dq = _require("diffusers", "diffusers")
        # diffusers' torchao loader looks at nn.Linear only; name the ones the plan keeps in float
        keep = sorted(n for n, (_, m) in module_precisions(plan, model).items() if isinstance(m, nn.Linear) and n not in converted)
        # diffusers matches these by substring (`name + "."` in a parameter name): drop any that would also catch a
        # converted module nested under the same path. The FqnToConfig maps them to nothing either way.
        keep = [k for k in keep if not any(f"{k}." in f"{c}.weight" for c in converted)]
        return Export("diffusers", dq.TorchAoConfig(quant_type=cfg, modules_to_not_convert=keep or None),
                      converted, skipped, approx, component)
    if target != "quanto":
        raise ExportError(f"unknown export target {target!r}; choose one of {TARGETS}")
    calls: dict[str, list[str]] = {"qint8": [], "qint4": [], "qfloat8": []}
    converted, skipped, approx = {}, {}, []
    for name, (p, mod) in module_precisions(plan, model).items():
        if not _exported(p):
            skipped[name] = _float_reason(p)
        elif not isinstance(mod, (nn.Linear, nn.Conv2d)):
            skipped[name] = f"{p} in the plan; quanto converts nn.Linear and nn.Conv2d, not {type(mod).__name__}"
        else:
            calls[QUANTO_WEIGHTS.get(p, "qint4")].append(name)
            converted[name] = p
            if p in GROUP:
                approx.append(f"{name}: {p}, quanto's qint4 chooses its own group size")
    exclude = sorted(skipped)
    spec = [{"weights": w, "include": sorted(names), "exclude": exclude} for w, names in calls.items() if names]
    return Export("quanto", spec, converted, skipped, approx)


def apply_quanto(model: nn.Module, calls: list[dict]) -> nn.Module:
    """Run the exported optimum-quanto calls on a model in place, then freeze it (weights stored quantized)."""
    quanto = _require("optimum.quanto", "optimum-quanto")
    for call in calls:
        quanto.quantize(model, weights=getattr(quanto, call["weights"]), include=call["include"], exclude=call["exclude"] or None)
    quanto.freeze(model)
    return model


def load_export(path: str | os.PathLike, *, pipeline: bool = False):
    """The library object an export file holds: torchao FqnToConfig, diffusers TorchAoConfig (or, with
    pipeline=True, a PipelineQuantizationConfig for its component), or the quanto call list."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        target, cfg = d["target"], d["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{path} is not a lafq export file ({e})") from None
    if target == "torchao":
        _require("torchao", "torchao")
        from torchao.core.config import config_from_dict
        return config_from_dict(cfg)
    if target == "diffusers":
        dq = _require("diffusers", "diffusers")
        _require("torchao", "torchao")
        qc = dq.TorchAoConfig.from_dict(cfg["quantization_config"])
        return dq.PipelineQuantizationConfig(quant_mapping={cfg["component"]: qc}) if pipeline else qc
    if target == "quanto":
        return cfg["calls"]
    raise ExportError(f"{path}: unknown export target {target!r}")
