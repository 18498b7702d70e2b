"""CLI commands for the quantization side: fisher, quantize, calibrate (W8A8 activation ranges) and report."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import paths
from .cliutil import device_arg as _device_arg
from .cliutil import emit as _emit
from .cliutil import CLIError, chunk_arg, fisher_size_args, number
from .checkpoint import atomic_write_bytes

DEFAULT_FISHER = str(paths.FISHER)


def policy_from_args(args):
    from .policy import Policy

    strategy = args.strategy or ("budget" if args.avg_bits is not None or args.budget_bytes is not None else "layer-ratio")
    statistic = args.statistic or ("mean" if strategy == "budget" else "final")
    kw = dict(strategy=strategy, target=args.target, high=args.high, statistic=statistic,
              protect_mid=args.protect_mid, seed=args.seed, avg_bits=args.avg_bits, budget_bytes=args.budget_bytes,
              signal=args.signal, edge=args.edge)
    if args.choices:
        kw["choices"] = tuple(c.strip() for c in args.choices.split(","))
    if args.threshold is not None:
        kw["threshold"] = args.threshold
    if args.p is not None:
        kw["p"] = args.p
    if args.k is not None:
        kw["k"] = args.k
    if args.group_thresholds:
        kw["group_thresholds"] = group_thresholds(args.group_thresholds)
    from .policy import STRATEGY_DEFS

    reads = STRATEGY_DEFS[strategy].reads
    unread = [f"--{f.replace('_', '-')}" for f in ("threshold", "p", "k", "avg_bits", "budget_bytes", "group_thresholds",
                                                  "choices", "protect_mid") if getattr(args, f, None) and f not in reads]
    if unread:  # given, and silently ignored before: say so
        print(f"note: strategy {strategy!r} does not read {', '.join(unread)} (it reads: "
              f"{', '.join('--' + f.replace('_', '-') for f in reads)})", file=sys.stderr)
    return Policy(**kw)


def group_thresholds(text: str) -> dict:
    """--group-thresholds: a JSON object of group name -> number in [0, 1]."""
    usage = "--group-thresholds takes a JSON object like '{\"encoder\": 0, \"decoder\": 1}'"
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{usage} ({str(e)[:80]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{usage}, got a {type(d).__name__}")
    bad = {str(k)[:20]: v for k, v in d.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 <= v <= 1)}
    if bad:
        raise ValueError(f"{usage}; thresholds must be numbers in [0, 1], got {str(bad)[:80]}")
    return {k: float(v) for k, v in d.items()}


def load_fisher(path):
    """FisherMap.load (one-line errors for files that are safetensors but not a complete Fisher map)."""
    from .fisher import FisherMap

    return FisherMap.load(path)


# -- one command per verb, for every model ------------------------------------------------------------------

def model_arg(p) -> None:
    """--model, the same for every verb: a lafq .safetensors U-Net (default: the shipped one), a diffusers
    pipeline or model folder, or a Hub id (`--checkpoint FILE` is the same option under its earlier name)."""
    p.add_argument("--model", "--checkpoint", dest="model", default=None,
                   help=f"the model: a lafq .safetensors U-Net (default {paths.UNET.relative_to(paths.REPO)}), "
                        "a diffusers pipeline or model folder, or a Hub repo id (owner/name)")
    p.add_argument("--subfolder", default=None, help="diffusers: the denoiser's subfolder (default: transformer or unet)")
    p.add_argument("--weights", default=None,
                   help="a quantized .safetensors of this model (quantize --out): used in place of its FP32 weights")


COMPUTE_CHOICES = ("dequantize", "int8-dynamic", "w8a8")


def compute_arg(p) -> None:
    """--compute (with --activations and --keep-float for w8a8): how a quantized model runs (lafq.int8)."""
    p.add_argument("--compute", choices=COMPUTE_CHOICES, default="dequantize",
                   help="how a quantized model computes: dequantize (default, any device), or the CPU integer "
                        "kernels int8-dynamic (activations quantized per call) and w8a8 (static activation scales "
                        "per timestep bin from --activations)")
    p.add_argument("--activations", type=Path, default=None,
                   help="w8a8: the activation ranges `python -m lafq calibrate` wrote for this quantized model")
    p.add_argument("--keep-float", default=None,
                   help="w8a8: comma-separated layers whose activations stay float (e.g. the most sensitive)")


def apply_compute(m: "ModelArg", args) -> "ModelArg":
    """Switch a quantized --model/--weights to --compute (in place on its module); one-line errors for options
    that do not go together or a model that is not quantized."""
    compute = getattr(args, "compute", "dequantize")
    if compute != "w8a8" and (args.activations is not None or args.keep_float):
        raise CLIError("--activations and --keep-float set up --compute w8a8: add it, or drop them")
    if compute == "dequantize":
        return m
    if getattr(args, "device", "auto") not in ("auto", "cpu"):
        raise CLIError(f"--compute {compute} runs CPU kernels (oneDNN, torch.ao): use --device cpu or auto")
    if getattr(m.den.module, "lafq_plan", None) is None:
        raise CLIError(f"--compute {compute} runs integer kernels on stored codes: give a quantized model "
                       "(--weights Q.safetensors from `quantize --out`)")
    from .int8 import ActivationRanges, int8_layers, use_int8_kernels, use_w8a8

    if not int8_layers(m.den.module):
        raise CLIError(f"--compute {compute}: no layer of this plan runs integer kernels here (int8 or per-channel "
                       "int4 Linears, or such 3x3 convolutions on a CPU with VNNI); it would be the dequantize path")
    if compute == "int8-dynamic":
        use_int8_kernels(m.den.module)
        return m
    if args.activations is None:
        raise CLIError("--compute w8a8 needs --activations FILE: write one with `python -m lafq calibrate --model ... "
                       "--weights Q.safetensors --out FILE`")
    keep = tuple(k.strip() for k in (args.keep_float or "").split(",") if k.strip())
    use_w8a8(m.den.module, ActivationRanges.load(args.activations), keep_float=keep)
    return m


@dataclass(frozen=True)
class ModelArg:
    """What --model named: its Denoiser, the pipeline folder it came from (None: a file or a Hub id), the folder
    its shipped files live in (`home`: the pipeline folder, or a model file's own folder) and its card
    (`home`/lafq.json, or None)."""
    den: object
    folder: Path | None
    card: object  # lafq.card.ModelCard or None
    home: Path | None = None

    @property
    def label(self) -> str:
        return self.den.source.get("path") or self.den.source.get("class", "model")


def load_model_arg(args) -> ModelArg:
    """--model as a Denoiser (one-line errors: a missing file or folder, a folder diffusers cannot read)."""
    from .card import CARD_FILE, ModelCard
    from .models import load

    spec = args.model or str(paths.UNET)
    p = Path(spec)
    if p.suffix == ".safetensors" or p.is_file():
        den, folder, home = load(p), None, p.parent
    else:
        from .cli_diffusers import load_folder

        den = load_folder(p, subfolder=getattr(args, "subfolder", None))
        folder = home = p if p.is_dir() else None
    card = ModelCard.read(home) if home is not None and (home / CARD_FILE).is_file() else None
    m = ModelArg(den, folder, card, home)
    if getattr(args, "weights", None):  # a quantized file of this model: its schedule and conditioning, these weights
        from .quantize import load_quantized

        q, _ = load_quantized(args.weights, like=m.den.module)
        m = replace(m, den=replace(m.den, module=q))
    if hasattr(args, "compute"):
        m = apply_compute(m, args)
    return m


def _fisher_data(args, m: ModelArg):
    """(images, labels or None, name) the map is scored on: --images (clean samples or latents, with
    --conditioning replayed), else --dataset (default: the model card's dataset: checkpoints/lafq.json names mnist-test10k for the U-Net)
    with each image's class label as its conditioning row."""
    from .data import load_dataset
    from .models import load_conditioning

    captions = getattr(args, "captions", None)
    if captions is not None and args.per_class:  # before any work: the text encoder is not loaded for nothing
        raise ValueError("--per-class maps classes; with --captions each image is its own row: drop --per-class")
    if args.images is not None:
        if args.dataset is not None:
            raise ValueError("give one of --images (clean samples) or --dataset (labelled images), not both")
        if captions is not None and args.conditioning:
            raise ValueError("give one of --captions (encoded by the pipeline's text encoder) or --conditioning "
                             "(captured rows), not both")
        images = _images(args.images, args.key)
        if captions is not None:
            return _captioned(m, images, captions, args.images)
        if args.conditioning:
            m = replace(m, den=m.den.with_conditioning(load_conditioning(args.conditioning), m.den.null_row))
        return m, images, None, str(args.images)
    if captions is not None or args.conditioning:
        raise ValueError(f"--dataset conditions on the images' class labels: {'--captions' if captions is not None else '--conditioning'} "
                         "goes with --images")
    name = args.dataset or (m.card.dataset if m.card is not None else None)
    if name is None:
        raise ValueError(f"{m.label} names no dataset (lafq.json \"dataset\"): give --dataset NAME, or --images "
                         "FILE (clean samples, e.g. VAE latents) with --conditioning")
    x, y = load_dataset(name).tensors()
    labelled = m.den.conditioning is not None and y is not None
    return m, x, (y if labelled else None), name


MAX_CAPTIONS_BYTES = 16 << 20


def read_captions(path) -> list[str]:
    """Captions from a text file (one per line) or a JSON list of strings; ValueError (one line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file (captions: one per line, or a JSON list of strings)")
    if path.stat().st_size > MAX_CAPTIONS_BYTES:
        raise ValueError(f"{path} has over {MAX_CAPTIONS_BYTES:,} bytes of captions")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text (captions: one per line, or a JSON list of strings)") from None
    if path.suffix == ".json":
        try:
            caps = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg})") from None
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{path} must hold a JSON list of strings")
    else:
        caps = text.splitlines()
    if not caps:
        raise ValueError(f"{path} has no captions")
    return caps


def _captioned(m: ModelArg, images: torch.Tensor, path, images_path):
    """Each image conditioned on its own caption (one caption: all images on it), encoded by the folder's text
    encoder (lafq.models.encode_captions); the empty caption is the unconditional row, drawn with --p-null's
    rate like a caption dropout in training."""
    from .models import encode_captions

    captions = read_captions(path)
    if len(captions) not in (1, len(images)):
        raise ValueError(f"{path} has {len(captions):,} captions for {len(images):,} images: give one per image "
                         "(line i captions image i) or one for all")
    if m.folder is None:
        raise ValueError("--captions needs --model to be a text-to-image pipeline folder (its tokenizer/ and "
                         "text_encoder/ encode them)")
    cond = encode_captions(m.folder, captions)
    den = m.den.with_conditioning(cond, null_row=len(captions))
    labels = torch.arange(len(images)) if len(captions) > 1 else torch.zeros(len(images), dtype=torch.long)
    return replace(m, den=den), images, labels, str(images_path)


def _images(path, key):
    from .cli_export import _images as read
    return read(path, key)


def cmd_fisher(args):
    from . import distributed
    from .device import resolve_device
    from .fisher import classes_of, fisher_map

    _deprecated(args, "fisher")
    m = load_model_arg(args)
    if getattr(m.den.module, "lafq_plan", None) is not None:
        raise ValueError("compute Fisher maps on the FP32 model, not a quantized one")
    m, images, labels, data_name = _fisher_data(args, m)
    m.den.require_inputs()  # before any work: one line for a model whose inputs nothing supplies
    if args.per_class and labels is None:
        raise ValueError("--per-class needs a class-conditional model and labelled images (--dataset)")
    device = distributed.init_from_env(resolve_device(args.device))  # under torchrun: this process's share
    m.den.module.to(device)
    groups = len(classes_of(m.den)) if args.per_class else 1
    bar = None
    if not args.json and distributed.is_main():
        from tqdm import tqdm
        bar = tqdm(total=args.bins * groups, desc="fisher", dynamic_ncols=True)
    t0 = time.perf_counter()
    captioned = getattr(args, "captions", None) is not None
    # Captions are rows of their own (one per image): draws over the images are uniform, not class-balanced.
    draws = args.draws if labels is not None and not captioned else "uniform"
    fm = fisher_map(m.den, images, labels=labels, draws=draws,
                    per_class=args.per_class, p_null=args.p_null if labels is not None else 0.0, bins=args.bins,
                    samples_per_bin=args.samples, seed=args.seed, chunk=args.chunk, method=args.method,
                    progress=(lambda d, t: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    fm.meta["images"] = data_name
    if captioned:
        fm.meta["captions"] = str(args.captions)
    if args.images is None:
        fm.meta["dataset"] = data_name
    if not torch.isfinite(fm.fisher).all():  # finite images, and still: the model's own overflow
        raise ValueError("the Fisher map has NaN or infinite values (the model overflows on these inputs); "
                         "nothing was written")
    processes = distributed.world()
    main = distributed.is_main()
    distributed.finish()
    if not main:  # rank 0 writes and reports; the map is the same on every process
        return
    # The shipped model's map is the shipped map; any other model's goes to the working directory (a folder's own
    # fisher.safetensors is not overwritten unasked).
    out = args.out or (Path(DEFAULT_FISHER) if args.model is None else Path("fisher.safetensors"))
    fm.save(out)
    layers, per_layer = fm.layer_names(), fm.per_layer()
    res = {"command": "fisher", "model": m.label, "class": m.den.source.get("class"), "out": str(out),
           "bins": args.bins, "samples_per_bin": args.samples, "device": str(device), "groups": fm.groups,
           "tensors": len(fm.names), "prediction_type": m.den.prediction_type, "methods": fm.meta["methods"],
           "seconds": round(time.perf_counter() - t0, 2), "processes": processes,
           "layer_fisher_mean": {layer: float(v) for layer, v in zip(layers, per_layer.mean(1))}}
    human = [f"wrote {out}: {len(fm.names)} tensors x {args.bins} bins ({args.samples} samples each) of "
             f"{m.den.source.get('class')} ({m.den.prediction_type}), groups {fm.groups}, {res['seconds']}s"
             + (f" on {processes} processes" if processes > 1 else ""), "mean Fisher per layer (per element):"]
    human += [f"  {layer:24} {float(v):.3e}" for layer, v in zip(layers, per_layer.mean(1))]
    _emit(args, res, "\n".join(human))


def register_fisher(sub):
    from .fisher import DRAWS
    from .persample import METHODS

    f = sub.add_parser("fisher", aliases=["fisher-model"],
                       help="the Fisher map of any model (tensor x timestep bin [x class])")
    model_arg(f)
    f.add_argument("--dataset", default=None,
                   help="labelled images, each scored with its class (default: the model card's dataset, "
                        "lafq.json beside the model; the shipped U-Net's is mnist-test10k)")
    f.add_argument("--images", default=None, help="instead: .safetensors of clean samples (N, C, H, W), e.g. VAE latents")
    f.add_argument("--key", default=None, help="tensor name in --images (default: 'images', else the first)")
    f.add_argument("--conditioning", default=None,
                   help="with --images: conditioning captured from a real call (lafq.models.save_conditioning)")
    f.add_argument("--captions", default=None,
                   help="with --images and a text-to-image pipeline folder: a text file, caption i of image i on "
                        "line i (or a JSON list), encoded by the folder's text encoder; the empty caption is "
                        "the unconditional row, drawn with probability --p-null")
    fisher_size_args(f, bins=50, samples=16)  # samples: per class with --per-class
    f.add_argument("--per-class", action="store_true", help="also one map per class")
    f.add_argument("--draws", choices=DRAWS, default="balanced",
                   help="labelled images: cycle through the classes (balanced) or draw uniformly")
    chunk_arg(f)
    f.add_argument("--method", choices=METHODS, default="hooks",
                   help="per-sample gradients: layer hooks (fastest on CPU), torch.func.vmap, or a naive loop; all exact")
    f.add_argument("--p-null", type=number("--p-null", 0, 1), default=None,
                   help="labelled images: how often the null class replaces the label, the branch guided sampling "
                        "also runs (default: 0.1, the training label dropout, for a model with a null class)")
    f.add_argument("--seed", type=int, default=0)
    _device_arg(f)
    f.add_argument("--out", type=Path, default=None,
                   help="default: checkpoints/fisher.safetensors for the shipped U-Net, else ./fisher.safetensors "
                        "(a model folder's own map, FOLDER/fisher.safetensors, is replaced only when named)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_fisher)


def cmd_quantize(args):
    import copy

    from .planfile import read_plan
    from .policy import make_plan, param_shapes
    from .quantize import quantize, save_quantized, size_report

    _deprecated(args, "quantize")
    if args.plan and args.model is None:  # the model the plan was made for
        args.model = _plan_model(args.plan)
    m = load_model_arg(args)
    model = m.den.module
    if getattr(model, "lafq_plan", None) is not None:
        raise ValueError("quantize the FP32 model, not a quantized one")
    shapes = param_shapes(model)
    if args.plan:
        plan = read_plan(Path(args.plan).read_bytes(), str(args.plan))
        plan.validate(shapes)  # also without --out: sizing an invalid plan would report nonsense
    else:
        from .policy import NO_FISHER_STRATEGIES

        policy = policy_from_args(args)
        fisher = args.fisher or (m.home / "fisher.safetensors" if m.home is not None else None)
        if args.fisher is None and policy.strategy in NO_FISHER_STRATEGIES:
            fisher = None  # nothing to rank: the plan needs only the model's tensors
        elif fisher is None:
            raise ValueError(f"give --fisher (a map of {m.label}, from `fisher --model`) for a policy, or --plan")
        plan = make_plan(policy, load_fisher(fisher) if fisher is not None else None, dict(model.named_parameters()))
        if args.refine:
            if policy.strategy != "budget" or policy.signal != "fisher":
                raise ValueError("--refine refines a Fisher budget plan: give --avg-bits or --budget-bytes")
            from .refine import RefineSettings, refine_budget

            log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
            budget = size_report(plan, shapes).total_bytes
            plan, refine_cost = refine_budget(m.den, load_fisher(fisher), budget,
                                              RefineSettings(max_evals=args.refine), statistic=policy.statistic,
                                              choices=policy.choices, log=log)
    if not plan.model:  # what it was made for: export and quantize --plan load it by default
        from .checkpoint import state_digest
        where = Path(args.model).resolve() if args.model and Path(args.model).exists() else args.model
        plan.model = {"class": m.den.source.get("class", type(model).__name__), "digest": state_digest(model),
                      **({"path": str(where)} if where else {})}
    report = size_report(plan, shapes)
    if args.out:
        report.file_bytes = save_quantized(args.out, quantize(copy.deepcopy(model), plan))
    if args.plan_out:
        atomic_write_bytes(args.plan_out, plan.to_json().encode())
    res = {"command": "quantize", "model": m.label, "out": str(args.out) if args.out else None,
           "policy": plan.policy, "size": report.to_dict(),
           **({"refine": refine_cost} if not args.plan and args.refine else {})}
    _emit(args, res, report.table() + (f"\nwrote {args.out}" if args.out else ""))


def register_quantize(sub):
    from .fisher import STATISTICS
    from .policy import BUDGET_CHOICES, SIGNALS, STRATEGIES
    from .precision import PRECISIONS

    q = sub.add_parser("quantize", aliases=["quantize-model"],
                       help="policy -> plan -> quantized model of any model, with its size table")
    model_arg(q)
    q.add_argument("--fisher", default=None,
                   help="the model's Fisher map (default: fisher.safetensors beside the model: MODEL/ for a folder, "
                        "the file's folder for a .safetensors model, checkpoints/ for the shipped U-Net)")
    q.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="default: budget when --avg-bits or --budget-bytes is given, else layer-ratio")
    q.add_argument("--target", choices=PRECISIONS, default="fp16", help="precision of the quantized tensors")
    q.add_argument("--high", choices=PRECISIONS, default="fp32", help="precision of the kept tensors")
    q.add_argument("--statistic", choices=STATISTICS, default=None,
                   help="Fisher over timesteps: final step, mean, max (default: mean for budget, else final)")
    q.add_argument("--threshold", type=number("--threshold", 0, 1), default=None,
                   help="global: fraction of the largest Fisher score, [0, 1]")
    q.add_argument("--group-thresholds", default=None,
                   help="groups: JSON over the model's encoder / mid / decoder, e.g. "
                        '\'{"encoder": 0, "mid": 1, "decoder": 1}\'')
    q.add_argument("--p", type=number("--p", 0, 1), default=None, help="layer-ratio: fraction of each layer's tensors, [0, 1]")
    q.add_argument("--k", type=number("--k", -100, 100), default=None, help="layer-std: quantize below mean + k*std of log Fisher")
    q.add_argument("--avg-bits", type=number("--avg-bits", 0.01, 32), default=None, help="budget/random: average bits per weight")
    q.add_argument("--budget-bytes", type=number("--budget-bytes", 1, 2**62, integer=True), default=None,
                   help="budget/random: total bytes")
    q.add_argument("--signal", choices=SIGNALS, default="fisher",
                   help="what weighs a tensor: Fisher, weight magnitude, or (budget) quantization error alone")
    q.add_argument("--choices", default=None,
                   help=f"budget: comma-separated precisions a tensor may take (default {','.join(BUDGET_CHOICES)})")
    q.add_argument("--edge", choices=PRECISIONS, default="int8",
                   help="first-last: precision of the model's first and last layers (the U-Net's stem and head)")
    q.add_argument("--protect-mid", action="store_true", help="keep the model's middle block in high precision")
    q.add_argument("--seed", type=int, default=0, help="random: allocation seed")
    q.add_argument("--plan", default=None, help="apply this plan JSON instead of a policy")
    q.add_argument("--out", type=Path, default=None, help="write the quantized model (.safetensors)")
    q.add_argument("--plan-out", type=Path, default=None, help="write the plan (JSON), e.g. for export")
    q.add_argument("--refine", type=number("--refine", 1, 1000, integer=True), nargs="?", const=24, default=None,
                   metavar="EVALS", help="budget: refine the exact plan by measurement (lafq.refine; at most EVALS "
                                         "calibration samplings, default 24: about a minute on 2 cores for the MNIST U-Net)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quantize)



def _plan_model(path) -> str | None:
    """The model path a plan file records (None: the shipped U-Net)."""
    from .planfile import read_plan

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such plan file: {p}")
    made_for = read_plan(p.read_bytes(), str(p)).model
    if "path" not in made_for and made_for.get("class", "UNet") != "UNet":
        raise ValueError(f"{p} was made for a {made_for['class']} and does not say where it is: pass --model")
    return made_for.get("path")


def _deprecated(args, verb: str) -> None:
    if getattr(args, "command", verb) != verb:  # the alias fisher-model / quantize-model
        print(f"note: `{args.command}` is deprecated: it is `{verb}` (with --model)", file=sys.stderr)


@dataclass(frozen=True)
class _ReportInputs:
    """What the report measures and where its records and report go."""
    model: object
    fisher: object
    subject: object  # lafq.report.Subject
    classifier: object
    backend: object
    evaluator: dict  # extra Evaluator fields for a model other than the project U-Net
    cache: Path
    out: Path
    den: object = None  # the lafq.models.Denoiser around `model` (None: the project U-Net, adapted by Evaluator)


def _report_subject(args) -> _ReportInputs:
    """What the report measures: the project U-Net (--checkpoint) or any --model (a pipeline folder or Hub id),
    with its Fisher map, classifier, FID backend, reference data and where its records and report go. A folder
    with a classifier and a card naming its reference data (train-diffusers writes both) gets FID, feature
    distance and class agreement; any other model is measured by pixel fidelity to FP32 only, conditioned on
    its card's classes, on --captions (text-to-image), or unconditionally."""
    from .classifier import load_classifier
    from .metrics import DEFAULT_CLASSIFIER, ClassifierBackend, get_backend
    from .pipeline import load_denoiser
    from .report import Subject, edge_layers

    if args.model is None:
        model, _ = load_denoiser(args.checkpoint or paths.UNET)
        return _ReportInputs(model=model, fisher=load_fisher(args.fisher or DEFAULT_FISHER), subject=Subject(),
                             classifier=load_classifier(DEFAULT_CLASSIFIER)[0], backend=get_backend(args.backend),
                             evaluator={}, cache=Path(args.cache_dir or paths.REPORT_CACHE),
                             out=Path(args.out_dir or paths.DOCS))
    from .cli_diffusers import _card, load_folder

    if args.checkpoint is not None:
        raise CLIError("--checkpoint and --model name two models; give one")
    if args.backend == "inception":
        raise CLIError("--model reports use the folder's own classifier as FID backend; drop --backend inception")
    folder = Path(args.model)
    captions = getattr(args, "captions", None)
    if captions is not None or not (folder / "classifier.safetensors").is_file():
        return _pixel_subject(args, folder, captions)
    card = _card(folder)
    den = load_folder(folder)
    model = den.module.eval()
    backend = ClassifierBackend(path=folder / "classifier.safetensors")
    subject = Subject(name=f"{card.name or folder.name} (`{folder}`)",
                      classifier=f"the features of the folder's classifier, `{folder / 'classifier.safetensors'}`",
                      reference=card.reference, floor_images=card.dataset, edge_layers=edge_layers(model),
                      source_strategies=False)
    return _ReportInputs(model=model, fisher=load_fisher(args.fisher or folder / "fisher.safetensors"),
                         subject=subject, classifier=backend.model, backend=backend, den=den,
                         evaluator=dict(reference=card.reference, stats_dir=folder / "stats"),
                         cache=Path(args.cache_dir or folder / "eval" / "report"),
                         out=Path(args.out_dir or folder / "report"))


def _clip_sample(folder) -> bool:
    """The scheduler's own `clip_sample` (diffusers' DDPM/DDIM default True; latent pipelines set it False), so the
    report samples as the pipeline does; flow-matching schedulers never clip."""
    from .models.diffusers_models import _layout, load_scheduler

    try:
        _, sched_sub = _layout(str(folder), None)
        return bool(load_scheduler(str(folder), sched_sub).config.get("clip_sample", True))
    except (OSError, ValueError):
        return True


def _pixel_subject(args, folder: Path, captions) -> _ReportInputs:
    """A model without a classifier (any pipeline folder or Hub id): pixel fidelity to FP32 only."""
    from .card import CARD_FILE, ModelCard
    from .cli_diffusers import load_folder
    from .report import Subject, edge_layers

    local = folder.is_dir()
    den = load_folder(folder)
    conditioning = "unconditional"
    if captions is not None:
        from .models import encode_captions

        if not local:
            raise CLIError("--captions needs --model to be a local text-to-image pipeline folder (its tokenizer/ and "
                           "text_encoder/ encode them)")
        caps = read_captions(captions)
        den = den.with_conditioning(encode_captions(folder, caps), null_row=len(caps))
        conditioning = f"caption-balanced ({len(caps):,} captions from `{captions}`, in turn)"
    elif den.conditioning is not None:
        conditioning = "class-balanced"
    den.require_inputs()  # one line for a text-to-image model given no captions
    card = ModelCard.read(folder) if local and (folder / CARD_FILE).is_file() else None
    fisher_path = Path(args.fisher) if args.fisher else folder / "fisher.safetensors"
    if not fisher_path.is_file():
        raise CLIError(f"no Fisher map at {fisher_path}: compute one with `python -m lafq fisher --model {folder} "
                       "... --out FILE` and pass --fisher FILE")
    home = folder if local else Path("lafq-report") / str(folder).replace("/", "--")  # a Hub id: a local home
    clip = _clip_sample(folder)
    model = den.module.eval()
    subject = Subject(name=f"{(card.name if card else '') or folder.name} (`{folder}`)", classifier=None,
                      reference=None, floor_images=None, edge_layers=edge_layers(model), source_strategies=False,
                      conditioning=conditioning,
                      **({"sampler": "Euler-{steps} (flow matching, the scheduler's own steps)"} if den.schedule.flow else {}))
    return _ReportInputs(model=model, fisher=load_fisher(fisher_path), subject=subject, classifier=None, backend=None,
                         den=den, evaluator={"reference": None, "clip": clip},
                         cache=Path(args.cache_dir or home / "eval" / "report"),
                         out=Path(args.out_dir or home / "report"))


def cmd_report(args):
    import shlex
    import sys

    from .device import resolve_device, strict_fp32
    from .evaluate import Evaluator
    from .pipeline import real_floor
    from .report import Settings, evaluate, feasible_budgets, floor_bits, grid, measured_scores, settings_with, write
    from .policy import param_shapes
    from .sensitivity import run as run_sensitivity, units

    from . import distributed

    device = distributed.init_from_env(resolve_device(args.device))  # under torchrun: this rank's device
    strict_fp32(device)
    shard = (distributed.rank(), distributed.world())
    main = distributed.is_main()
    sub = _report_subject(args)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    if not main:
        log = lambda m: None  # noqa: E731 -- rank 0 speaks for the run
    model, fisher, subject = sub.model, sub.fisher, sub.subject
    base = Settings.quick() if args.quick else Settings()
    s = settings_with(base, n=args.n, steps=args.steps, seeds=args.seeds, guidance=args.guidance,
                      random_seeds=args.random_seeds, batch_size=args.batch_size)
    if args.sensitivity_precisions:
        from dataclasses import replace as _replace

        s = _replace(s, sensitivity=_replace(s.sensitivity, also=tuple(
            p.strip() for p in args.sensitivity_precisions.split(",") if p.strip())))
    shapes = param_shapes(model)
    lo = floor_bits(shapes)
    feasible = feasible_budgets(shapes, s.budgets)
    if feasible != s.budgets:
        log(f"budgets below this model's floor of {lo:.2f} bits/weight left out: "
            + ", ".join(f"{b:g}" for b in s.budgets if b not in feasible))
        s = settings_with(s, budgets=feasible)
    classifier, backend = sub.classifier, sub.backend
    cache = sub.cache / ("quick" if args.quick else "full")
    # Stage 1 first: its measured single-tensor damage also plans a row of the grid. Skipped, it reads what an
    # earlier run measured (and the report says the stage is not part of this run).
    skip = args.skip_sensitivity

    def sensitivity(cached_only: bool, shard=(0, 1), log=log):
        return run_sensitivity(Evaluator(sub.den or model, classifier, None, cache / "sensitivity", device=device,
                                         log=log, cached_only=cached_only, shard=shard, **sub.evaluator),
                               fisher, s.sensitivity, s.guidance, log=(lambda _: None) if skip else log)
    stage = sensitivity(args.render or skip, shard)
    if shard[1] > 1 and not (args.render or skip):  # every rank plans the same grid: all ranks' records
        distributed.barrier()
        stage = sensitivity(True, log=lambda _: None)
    sens = [] if skip else stage
    measured = measured_scores(stage)
    if len(measured) < len(units(shapes, s.sensitivity.unit)):
        measured = {}  # a partial stage: no measured plan from some tensors only
    rows = grid(model, fisher, s, subject, measured)  # planned on the CPU, beside the Fisher map
    model.to(device)
    given = [("model", args.model), ("checkpoint", args.checkpoint), ("fisher", args.fisher),
             ("captions", getattr(args, "captions", None)), ("n", args.n),
             ("steps", args.steps), ("seeds", args.seeds), ("guidance", args.guidance),
             ("random_seeds", args.random_seeds), ("batch_size", args.batch_size),
             ("sensitivity_precisions", args.sensitivity_precisions),
             ("backend", None if args.backend == "auto" else args.backend),
             ("device", None if args.device == "auto" else args.device), ("cache_dir", args.cache_dir),
             ("out_dir", args.out_dir)]
    command = "python -m lafq report" + (" --quick" if args.quick else "") + "".join(
        f" --{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in given if v is not None) + (
        " --skip-sensitivity" if args.skip_sensitivity else "")
    out_dir = sub.out
    t0 = time.perf_counter()
    floor = None if backend is None or not main else real_floor(
        backend, s.n, list(range(s.seeds)), train=subject.floor_images, reference=subject.reference,
        stats_dir=sub.evaluator.get("stats_dir"))
    # Rewrite the files after every (plan, seed): an interrupted run leaves a readable, marked-partial report.
    n_units = len(units(shapes, s.sensitivity.unit))
    on_record = lambda recs: write(recs, s, command, out_dir, total_rows=len(rows), floor=floor,  # noqa: E731
                                   sensitivity=sens, sensitivity_units=n_units, subject=subject,
                                   budget_floor_bits=lo, sensitivity_skipped=args.skip_sensitivity)
    def grid_records(cached_only: bool, shard=(0, 1), log=log, on_record=None):
        return evaluate(rows, Evaluator(sub.den or model, classifier, backend, cache, device=device, log=log,
                                        cached_only=cached_only, shard=shard, **sub.evaluator),
                        s, log=log, on_record=on_record)
    records = grid_records(args.render, shard, on_record=on_record if main and not args.render else None)
    if shard[1] > 1:  # rank 0 writes the report from every rank's records, once all are on disk
        distributed.barrier()
        if main:
            records = grid_records(True, log=lambda _: None)
    if not main:
        distributed.finish()
        return
    write(records, s, command, out_dir, total_rows=len(rows), floor=floor, sensitivity=sens, sensitivity_units=n_units,
          subject=subject, budget_floor_bits=lo, sensitivity_skipped=args.skip_sensitivity)
    distributed.finish()
    seconds = time.perf_counter() - t0
    _emit(args, {"command": "report", "rows": len(rows), "records": len(records), "seconds": round(seconds, 1),
                 "out_dir": str(out_dir)},
          f"wrote {out_dir}/report.md, report.csv, sensitivity.csv and figures ({seconds / 60:.1f} min)")


def register_report(sub):
    r = sub.add_parser("report", help="the evidence: sensitivity validation and the plan grid -> docs/report.md, .csv, .svg")
    r.add_argument("--checkpoint", default=None, help=f"the project U-Net to measure (default {paths.UNET.name})")
    r.add_argument("--model", type=Path, default=None,
                   help="any pipeline folder or Hub id to measure instead (records in DIR/eval/report, the report in "
                        "DIR/report); with classifier.safetensors, lafq.json and stats/ (train-diffusers writes them) "
                        "also FID, feature distance and class agreement, else pixel fidelity to FP32 only")
    r.add_argument("--captions", type=Path, default=None,
                   help="text-to-image --model: prompts (one per line, or a JSON list) the samples cycle through")
    r.add_argument("--fisher", default=None, help="the Fisher map (default: the model's)")
    r.add_argument("--quick", action="store_true", help="small N, few steps and rows: minutes on 2 cores")
    r.add_argument("--n", type=number("--n", 2, 10**7, integer=True), default=None,
                   help="samples per seed (default 1000; quick 50)")
    r.add_argument("--steps", type=number("--steps", 1, 1000, integer=True), default=None,
                   help="DDIM steps (default 50; quick 10)")
    r.add_argument("--seeds", type=number("--seeds", 1, 1000, integer=True), default=None, help="sampling seeds (default 3)")
    r.add_argument("--random-seeds", type=number("--random-seeds", 1, 100, integer=True), default=None,
                   help="random controls per plan (default 5; quick 2)")
    r.add_argument("--guidance", type=number("--guidance", 0, 50), default=None,
                   help="classifier-free guidance (default: the library's)")
    r.add_argument("--batch-size", type=number("--batch-size", 1, 256, integer=True), default=None,
                   help="images per sampling batch of the grid (default 128; the sensitivity stage keeps 128); "
                        "a different size is a different set of records")
    r.add_argument("--backend", choices=("auto", "classifier", "inception"), default="auto")
    r.add_argument("--skip-sensitivity", action="store_true", help="only the plan grid")
    r.add_argument("--sensitivity-precisions", default=None, metavar="LIST",
                   help="also lower each unit alone to these precisions (e.g. int8,int4-g32,fp16): the formats "
                        "budget plans use, beside INT4")
    r.add_argument("--render", action="store_true",
                   help="write the report from the records already in --cache-dir, sampling nothing")
    r.add_argument("--cache-dir", default=None,
                   help="finished (plan, seed) records; a rerun resumes from them (default checkpoints/eval/report)")
    _device_arg(r)
    r.add_argument("--out-dir", default=None, help="where the report is written (default docs/)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)


def register_calibrate(sub):
    c = sub.add_parser("calibrate", help="W8A8: a quantized model's activation ranges per timestep bin (for "
                                         "sample/fid --compute w8a8 --activations FILE)")
    model_arg(c)
    c.add_argument("--n", type=number("--n", 1, 4096, integer=True), default=16, help="calibration samples")
    c.add_argument("--steps", type=number("--steps", 1, 1000, integer=True), default=25, help="DDIM steps")
    c.add_argument("--bins", type=number("--bins", 1, 1000, integer=True), default=5,
                   help="timestep bins, each with its own activation scales")
    c.add_argument("--seed", type=number("--seed", 0, 2**63 - 1, integer=True), default=1,
                   help="calibration noise (default 1: not evaluation seed 0's)")
    c.add_argument("--guidance", type=number("--guidance", 0, 100), default=None,
                   help="classifier-free guidance (default: the model card's)")
    c.add_argument("--out", type=Path, required=True, help="the activation ranges (.safetensors)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args):
    from .diffusion import DEFAULT_GUIDANCE
    from .int8 import calibrate_activations

    m = load_model_arg(args)
    if getattr(m.den.module, "lafq_plan", None) is None:
        raise CLIError("calibrate measures a quantized model's activations: give --weights Q.safetensors "
                       "(from `quantize --out`)")
    guidance = args.guidance if args.guidance is not None else (
        m.card.guidance if m.card is not None and m.card.null_class is not None else DEFAULT_GUIDANCE)
    t0 = time.perf_counter()
    ranges = calibrate_activations(m.den, n=args.n, steps=args.steps, guidance=guidance, bins=args.bins, seed=args.seed)
    if not ranges.ranges:
        raise CLIError("this plan has no convolution with static int8 activations here (int8 or per-channel int4 "
                       "3x3 convolutions on a CPU with VNNI): nothing to calibrate (its Linears quantize "
                       "activations per call)")
    ranges.save(args.out)
    drift = ranges.drift()
    worst = max(drift, key=drift.get)
    res = {"command": "calibrate", "out": str(args.out), "layers": len(ranges.ranges), "bins": ranges.bins,
           "n": args.n, "steps": args.steps, "guidance": guidance, "seed": args.seed, "digest": ranges.digest(),
           "drift": {k: round(v, 4) for k, v in drift.items()}, "seconds": round(time.perf_counter() - t0, 3)}
    _emit(args, res, f"wrote {args.out}: activation ranges of {len(ranges.ranges)} layers in {ranges.bins} timestep "
                     f"bins ({args.n} samples, DDIM-{args.steps}, guidance {guidance:g}, seed {args.seed}); widest "
                     f"drift {drift[worst]:.2f}x ({worst}): use with --compute w8a8 --activations {args.out}")


REGISTER = [register_fisher, register_quantize, register_report, register_calibrate]
