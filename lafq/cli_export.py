"""CLI command `export`: a plan as torchao, diffusers or optimum-quanto load it (lafq.export); and the reader of
clean-sample files (`fisher --images`)."""
from __future__ import annotations

from pathlib import Path

from . import paths
from .cliutil import emit as _emit

DEFAULT_MODEL = str(paths.UNET)


def _load_model(path: str):
    """A lafq U-Net checkpoint (.safetensors) or a diffusers model / pipeline folder (or Hub repo id)."""
    if str(path).endswith(".safetensors"):
        from .pipeline import load_denoiser
        model, meta = load_denoiser(path)
        if meta.get("kind") != "unet":
            raise ValueError(f"{path} holds a {meta.get('kind')!r}; export from the FP32 model the plan was made for")
        return model, "lafq"
    from .models.diffusers_models import load_diffusers_model
    try:
        return load_diffusers_model(path), "diffusers"
    except ImportError:
        raise ValueError("a diffusers model folder needs diffusers: pip install -r requirements.txt") from None
    except OSError as e:  # from_pretrained's "not found" for a missing folder or repo
        raise ValueError(f"cannot load {path}: {str(e).splitlines()[0]}") from None


def cmd_export(args):
    from .export import export_plan
    from .planfile import read_plan
    from .policy import param_shapes

    plan_path = Path(args.plan)
    if not plan_path.is_file():
        raise FileNotFoundError(f"no such plan file: {plan_path}")
    plan = read_plan(plan_path.read_bytes(), str(plan_path))  # the strict reader every command uses
    if args.model is None:  # the model the plan was made for (a plan without that record: the shipped U-Net)
        if "path" not in plan.model and plan.model.get("class", "UNet") != "UNet":
            raise ValueError(f"{plan_path} was made for a {plan.model['class']} and does not say where it is: "
                             "pass --model")
        args.model = plan.model.get("path") or DEFAULT_MODEL
    model, kind = _load_model(args.model)
    if args.to == "diffusers" and kind != "diffusers":
        raise ValueError("--to diffusers writes a diffusers TorchAoConfig: --model must be a diffusers model folder "
                         "(for the lafq U-Net use --to torchao or --to quanto)")
    plan.validate(param_shapes(model))  # names the model lacks, integer formats on vectors: refused here
    component = _component(args.model, model, args.component)
    exp = export_plan(plan, model, args.to, component=component, int4_kernel=args.int4_kernel)
    out = Path(args.out) if args.out else plan_path.with_suffix(f".{args.to}.json")
    exp.save(out)
    from .export import stored_bytes
    from .quantize import size_report

    size = size_report(plan, param_shapes(model))
    lib = stored_bytes(model, exp.converted)
    res = {"command": "export", "out": str(out), "to": args.to, "model": str(args.model), "component": component,
           "converted": len(exp.converted), "not_converted": len(exp.not_converted),
           "approximations": exp.approximations, "stored_bytes": lib, "plan_bytes": size.total_bytes,
           "fp32_bytes": size.fp32_bytes}
    human = [(f"wrote {out}: {len(exp.converted)} modules converted for {args.to}, {len(exp.not_converted)} kept "
              f"as they are (reasons in the file)"),
             f"{args.to} stores about {lib:,} bytes ({100 * lib / size.fp32_bytes:.1f}% of FP32); the plan in LAFQ's "
             f"own storage takes {size.total_bytes:,} ({size.pct_of_fp32:.1f}%)"]
    if lib > 1.1 * size.total_bytes:
        human.append("  the difference: modules the library does not convert stay in the model's dtype"
                     + (" (torchao converts nn.Linear only; convolutions stay FP32)" if args.to != "quanto" else ""))
    human += [f"  approximated: {a}" for a in exp.approximations]
    _emit(args, res, "\n".join(human))


def _component(path, model, asked: str | None) -> str:
    """The pipeline component a diffusers export is for: the one asked for, which a pipeline folder must have;
    by default the pipeline's denoiser (transformer/ or unet/), or for a bare model its class's kind. A fixed
    "unet" default made a DiT pipeline print one warning and sample in FP32: the export silently ignored."""
    import json

    folder = Path(str(path))
    index = folder / "model_index.json"
    if index.is_file():
        try:
            listed = [k for k, v in json.loads(index.read_text(encoding="utf-8")).items() if isinstance(v, list)]
        except (ValueError, AttributeError):
            raise ValueError(f"{index} is not a diffusers model_index.json") from None
        found = "transformer" if (folder / "transformer").is_dir() else "unet"
        if asked is None:
            return found
        if asked not in listed:
            raise ValueError(f"{folder} is a pipeline without a {asked!r} component (it has {', '.join(listed)}; "
                             f"its denoiser is {found!r})")
        return asked
    return asked or ("transformer" if "Transformer" in type(model).__name__ else "unet")


def _images(path: str, key: str | None):
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a .safetensors file ({e})") from None
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    name = key or ("images" if "images" in tensors else min(tensors))
    if name not in tensors:
        raise ValueError(f"{path} has no tensor {name!r}; it has {sorted(tensors)}")
    images = tensors[name]
    if images.dim() < 2 or not images.is_floating_point():
        raise ValueError(f"{path}: tensor {name!r} is {tuple(images.shape)} {images.dtype}; images are a float tensor "
                         "(N, C, H, W) or latents")
    bad = int((~torch.isfinite(images)).sum())
    if bad:  # a map from them would be all NaN, written with exit 0
        raise ValueError(f"{path}: tensor {name!r} holds {bad:,} NaN or infinite values; give finite images")
    return images


def register(sub) -> None:
    from .export import INT4_KERNELS, TARGETS

    e = sub.add_parser("export", help="write a plan as torchao / diffusers / optimum-quanto load it")
    e.add_argument("--plan", required=True, help="plan JSON (from `quantize --plan-out` or the app)")
    e.add_argument("--to", required=True, choices=TARGETS)
    e.add_argument("--model", default=None,
                   help="the FP32 model the plan is for: a lafq .safetensors or a diffusers model/pipeline folder "
                        "(default: the model the plan records, else the shipped U-Net)")
    e.add_argument("--component", default=None,
                   help="diffusers: the pipeline component (default: the pipeline's denoiser, unet or transformer)")
    e.add_argument("--int4-kernel", choices=INT4_KERNELS, default="intx",
                   help="torchao int4: intx (CPU and GPU) or tinygemm (GPU, bfloat16 models)")
    e.add_argument("--out", default=None, help="output JSON (default: PLAN.<to>.json)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)


REGISTER = [register]
