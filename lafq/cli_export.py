"""`python -m lafq export`: a plan as torchao, diffusers or optimum-quanto load it (lafq.export)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "checkpoints/unet.safetensors"


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
        raise ValueError("a diffusers model folder needs diffusers: pip install -r requirements-bench.txt") from None
    except OSError as e:  # from_pretrained's "not found" for a missing folder or repo
        raise ValueError(f"cannot load {path}: {str(e).splitlines()[0]}") from None


def cmd_export(args):
    from .cli import _emit
    from .export import export_plan
    from .policy import Plan

    plan_path = Path(args.plan)
    if not plan_path.is_file():
        raise FileNotFoundError(f"no such plan file: {plan_path}")
    plan = Plan.from_json(plan_path.read_text(encoding="utf-8"))
    model, kind = _load_model(args.model)
    if args.to == "diffusers" and kind != "diffusers":
        raise ValueError("--to diffusers writes a diffusers TorchAoConfig: --model must be a diffusers model folder "
                         "(for the lafq U-Net use --to torchao or --to quanto)")
    exp = export_plan(plan, model, args.to, component=args.component, int4_kernel=args.int4_kernel)
    out = Path(args.out) if args.out else plan_path.with_suffix(f".{args.to}.json")
    exp.save(out)
    res = {"command": "export", "out": str(out), "to": args.to, "model": str(args.model),
           "converted": len(exp.converted), "not_converted": len(exp.not_converted),
           "approximations": exp.approximations}
    human = [(f"wrote {out}: {len(exp.converted)} modules converted for {args.to}, {len(exp.not_converted)} kept "
              f"as they are (reasons in the file)")]
    human += [f"  approximated: {a}" for a in exp.approximations]
    _emit(args, res, "\n".join(human))


def register(sub) -> None:
    from .export import INT4_KERNELS, TARGETS

    e = sub.add_parser("export", help="write a plan as torchao / diffusers / optimum-quanto load it")
    e.add_argument("--plan", required=True, help="plan JSON (from `quantize --plan-out` or the app)")
    e.add_argument("--to", required=True, choices=TARGETS)
    e.add_argument("--model", default=DEFAULT_MODEL,
                   help="the FP32 model the plan is for: a lafq .safetensors or a diffusers model/pipeline folder")
    e.add_argument("--component", default="unet", help="diffusers: the pipeline component (unet, transformer)")
    e.add_argument("--int4-kernel", choices=INT4_KERNELS, default="intx",
                   help="torchao int4: intx (CPU and GPU) or tinygemm (GPU, bfloat16 models)")
    e.add_argument("--out", default=None, help="output JSON (default: PLAN.<to>.json)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)


REGISTER = [register]
