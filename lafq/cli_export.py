"""CLI commands for models of any architecture:

    export        a plan as torchao, diffusers or optimum-quanto load it (lafq.export)
    fisher-model  the Fisher map of a diffusers model on clean samples (lafq.fisher), replaying
                  conditioning captured with lafq.models.capture_conditioning + save_conditioning
    quantize-model  policy (or plan) -> quantized diffusers model file (lafq.quantize), with its size table
"""
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
    model, kind = _load_model(args.model)
    if args.to == "diffusers" and kind != "diffusers":
        raise ValueError("--to diffusers writes a diffusers TorchAoConfig: --model must be a diffusers model folder "
                         "(for the lafq U-Net use --to torchao or --to quanto)")
    plan.validate(param_shapes(model))  # names the model lacks, integer formats on vectors: refused here
    component = _component(args.model, model, args.component)
    exp = export_plan(plan, model, args.to, component=component, int4_kernel=args.int4_kernel)
    out = Path(args.out) if args.out else plan_path.with_suffix(f".{args.to}.json")
    exp.save(out)
    res = {"command": "export", "out": str(out), "to": args.to, "model": str(args.model), "component": component,
           "converted": len(exp.converted), "not_converted": len(exp.not_converted),
           "approximations": exp.approximations}
    human = [(f"wrote {out}: {len(exp.converted)} modules converted for {args.to}, {len(exp.not_converted)} kept "
              f"as they are (reasons in the file)")]
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


def _dataset_draws(args):
    """--dataset: its images, their class labels as conditioning rows, and the null class of the model's
    lafq.json (`class_labels` rows 0..null_class; row null_class is the unconditional branch)."""

    import torch

    from .data import load_dataset
    from .models import Conditioning

    if args.conditioning:
        raise ValueError("--dataset conditions on the images' class labels: leave out --conditioning")
    from .cli_diffusers import _card

    null = _card(Path(args.model)).null_class  # one-line errors for a missing or incomplete lafq.json
    images, labels = load_dataset(args.dataset).tensors()
    return images, labels, Conditioning({"class_labels": torch.arange(null + 1)}, null + 1), null


def cmd_fisher_model(args):
    import time

    import torch

    from .device import resolve_device
    from .fisher import fisher_map
    from .models import load_conditioning, load_diffusers

    if (args.images is None) == (args.dataset is None):
        raise ValueError("give one of --images (a .safetensors of clean samples) or --dataset (a 28x28 dataset name)")
    image_rows, null_row = None, None
    if args.dataset:
        images, image_rows, cond, null_row = _dataset_draws(args)
    else:
        images = _images(args.images, args.key)
        cond = load_conditioning(args.conditioning) if args.conditioning else None
    try:
        den = load_diffusers(args.model, subfolder=args.subfolder, conditioning=cond)
    except ImportError:
        raise ValueError("fisher-model needs diffusers: pip install -r requirements.txt") from None
    except OSError as e:
        raise ValueError(f"cannot load {args.model}: {str(e).splitlines()[0]}") from None
    den = den.with_conditioning(den.conditioning, null_row)
    from . import distributed

    device = distributed.init_from_env(resolve_device(args.device))  # under torchrun: this process's share
    den.module.to(device)
    t0 = time.perf_counter()
    fm = fisher_map(den, images, bins=args.bins, samples_per_bin=args.samples, seed=args.seed, method=args.method,
                    labels=image_rows, p_null=args.p_null if args.dataset else 0.0, chunk=args.chunk)
    fm.meta["images"] = str(args.images or args.dataset)
    if not torch.isfinite(fm.fisher).all():  # finite images, and still: the model's own overflow
        raise ValueError("the Fisher map has NaN or infinite values (the model overflows on these inputs); "
                         "nothing was written")
    main = distributed.is_main()
    distributed.finish()
    if not main:  # rank 0 writes and reports; the map is the same on every process
        return
    fm.save(args.out)
    res = {"command": "fisher-model", "out": str(args.out), "model": str(args.model), "class": den.source["class"],
           "prediction_type": den.prediction_type, "tensors": len(fm.names), "bins": args.bins,
           "samples_per_bin": args.samples, "methods": fm.meta["methods"], "device": str(device),
           "seconds": round(time.perf_counter() - t0, 2)}
    _emit(args, res, f"wrote {args.out}: {den.source['class']} ({den.prediction_type}), {len(fm.names)} tensors x "
                     f"{args.bins} bins, per-sample gradients {fm.meta['methods']}, {res['seconds']}s on {device}")


def register_fisher_model(sub) -> None:
    from .cliutil import chunk_arg, fisher_size_args, number
    from .persample import METHODS

    f = sub.add_parser("fisher-model", help="Fisher map of a diffusers model (UNet2D, UNet2DCondition, DiT, ...)")
    f.add_argument("--model", required=True, help="a diffusers pipeline or model folder (or Hub repo id) with its scheduler")
    f.add_argument("--subfolder", default=None, help="the denoiser's subfolder (default: transformer or unet)")
    f.add_argument("--images", default=None, help=".safetensors with clean samples (N, C, H, W), e.g. VAE latents")
    f.add_argument("--dataset", default=None,
                   help="instead of --images: a 28x28 dataset (fashion-test, ...), each image with its class label "
                        "as conditioning; needs the model folder's lafq.json (train-diffusers)")
    f.add_argument("--p-null", type=number("--p-null", 0, 1), default=0.1,
                   help="with --dataset: how often the null class replaces the label (training's label dropout)")
    f.add_argument("--key", default=None, help="tensor name in --images (default: 'images', else the first)")
    f.add_argument("--conditioning", default=None, help="captured conditioning (lafq.models.save_conditioning)")
    fisher_size_args(f, bins=20, samples=16)
    chunk_arg(f)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--method", choices=METHODS, default="hooks")
    f.add_argument("--device", default="auto", help="auto (the GPU where there is one), cpu, cuda or cuda:N")
    f.add_argument("--out", type=Path, default=Path("fisher-model.safetensors"))
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_fisher_model)


def cmd_quantize_model(args):
    from .cli_quant import policy_from_args
    from .fisher import FisherMap
    from .models.diffusers_models import load_diffusers_model
    from .policy import make_plan, param_shapes
    from .quantize import quantize, save_quantized, size_report

    try:
        model = load_diffusers_model(args.model, subfolder=args.subfolder)
    except ImportError:
        raise ValueError("quantize-model needs diffusers: pip install -r requirements.txt") from None
    except OSError as e:
        raise ValueError(f"cannot load {args.model}: {str(e).splitlines()[0]}") from None
    if args.plan:
        from .planfile import read_plan
        plan = read_plan(Path(args.plan).read_bytes(), str(args.plan))
        plan.validate(param_shapes(model))  # as `quantize` and the app refuse them
    else:
        if not args.fisher:
            raise ValueError("give --fisher (from fisher-model) for a policy, or --plan")
        plan = make_plan(policy_from_args(args), FisherMap.load(args.fisher), dict(model.named_parameters()))
    report = size_report(plan, param_shapes(model))
    if args.out:
        report.file_bytes = save_quantized(args.out, quantize(model, plan))
    if args.plan_out:
        from .checkpoint import atomic_write_bytes
        atomic_write_bytes(args.plan_out, plan.to_json().encode())
    res = {"command": "quantize-model", "model": str(args.model), "out": str(args.out) if args.out else None,
           "policy": plan.policy, "size": report.to_dict()}
    _emit(args, res, report.table() + (f"\nwrote {args.out}" if args.out else ""))


def register_quantize_model(sub) -> None:
    from .fisher import STATISTICS
    from .policy import SIGNALS, STRATEGIES
    from .precision import PRECISIONS

    q = sub.add_parser("quantize-model", help="policy -> plan -> quantized diffusers model (.safetensors)")
    q.add_argument("--model", required=True, help="a diffusers pipeline or model folder (or Hub repo id)")
    q.add_argument("--subfolder", default=None)
    q.add_argument("--fisher", default=None, help="the model's Fisher map (fisher-model)")
    q.add_argument("--plan", default=None, help="apply this plan JSON instead of a policy")
    q.add_argument("--strategy", choices=STRATEGIES, default="budget")
    q.add_argument("--target", choices=PRECISIONS, default="int8")
    q.add_argument("--statistic", choices=STATISTICS, default="mean")
    q.add_argument("--p", type=float, default=None, help="layer-ratio: fraction of each layer's tensors")
    q.add_argument("--avg-bits", type=float, default=None, help="budget/random: average bits per weight")
    q.add_argument("--budget-bytes", type=int, default=None)
    q.add_argument("--signal", choices=SIGNALS, default="fisher")
    q.add_argument("--choices", default=None, help="budget: comma-separated precisions a tensor may take")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", type=Path, default=None, help="write the quantized model (.safetensors)")
    q.add_argument("--plan-out", type=Path, default=None, help="write the plan (JSON), e.g. for export")
    q.add_argument("--json", action="store_true")
    # the rest of the policy keeps its defaults (the U-Net-specific options live on `quantize`)
    q.set_defaults(func=cmd_quantize_model, high="fp32", threshold=None, k=None, group_thresholds=None,
                   protect_mid=False, edge="int8")


def register(sub) -> None:
    from .export import INT4_KERNELS, TARGETS

    e = sub.add_parser("export", help="write a plan as torchao / diffusers / optimum-quanto load it")
    e.add_argument("--plan", required=True, help="plan JSON (from `quantize --plan-out` or the app)")
    e.add_argument("--to", required=True, choices=TARGETS)
    e.add_argument("--model", default=DEFAULT_MODEL,
                   help="the FP32 model the plan is for: a lafq .safetensors or a diffusers model/pipeline folder")
    e.add_argument("--component", default=None,
                   help="diffusers: the pipeline component (default: the pipeline's denoiser, unet or transformer)")
    e.add_argument("--int4-kernel", choices=INT4_KERNELS, default="intx",
                   help="torchao int4: intx (CPU and GPU) or tinygemm (GPU, bfloat16 models)")
    e.add_argument("--out", default=None, help="output JSON (default: PLAN.<to>.json)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)


REGISTER = [register, register_fisher_model, register_quantize_model]
