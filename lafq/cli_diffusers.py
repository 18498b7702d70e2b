"""CLI commands for the class-conditional diffusers UNet2DModel / DiT folders that lafq trains:

    train-diffusers  train on a 28x28 dataset (lafq.train_diffusers) into a pipeline folder that
                     `fisher --model`, `quantize --model` and lafq.models.load_diffusers read; resumes from
                     OUT/train_state.safetensors when one is there
    fid-model        FID (classifier backend) and class accuracy of such a folder, mean and 95% CI over
                     seeds, against the reference split its lafq.json names; per-seed results cached as
                     JSON in --out-dir, reference statistics in --stats-dir; optionally the real-vs-real floor
"""
from __future__ import annotations

import time
from pathlib import Path


def cmd_train_diffusers(args):
    import torch

    from .cliutil import emit as _emit
    from .device import resolve_device
    from .train import TrainConfig
    from .train_diffusers import DiTConfig, UNet2DConfig, train_diffusers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.until is not None and args.until > args.steps:
        raise ValueError(f"--until {args.until} is past --steps {args.steps}")
    cfg = TrainConfig(dataset=args.dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup=min(TrainConfig.warmup, max(1, args.steps // 10)), seed=args.seed,
                      save_every=args.save_every, sample_every=args.sample_every, log_every=args.log_every)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    model_cfg = DiTConfig(patch_size=args.patch_size) if args.arch == "dit" else UNet2DConfig()
    rec = train_diffusers(args.out, cfg, model_cfg, resume=not args.no_resume, progress=not args.json,
                          until=args.until, device=device)
    res = {"command": "train-diffusers", "out": str(args.out), **rec, "device": str(device),
           "seconds_this_call": round(time.perf_counter() - t0, 1)}
    _emit(args, res, f"trained to step {rec['step']} (loss {rec.get('loss', float('nan')):.4f}); "
                     f"wrote {args.out}/{'transformer' if args.arch == 'dit' else 'unet'}, {args.out}/scheduler, "
                     f"{args.out}/lafq.json")


def register(sub) -> None:
    from .cliutil import device_arg as _device_arg, number, positive as _positive
    from .train import TrainConfig

    t = sub.add_parser("train-diffusers", help="train a class-conditional diffusers UNet2DModel or DiT (pipeline folder; resumes)")
    t.add_argument("--dataset", default="fashion-train", help="fashion-train, mnist-test10k, ...")
    t.add_argument("--arch", choices=("unet", "dit"), default="unet",
                   help="unet: a UNet2DModel; dit: a class-conditional DiTTransformer2DModel (adaLN-Zero)")
    t.add_argument("--patch-size", type=_positive("--patch-size"), default=2, help="dit: patch size (divides 28)")
    t.add_argument("--out", type=Path, required=True, help="the pipeline folder to write (e.g. checkpoints/fashion)")
    t.add_argument("--steps", type=_positive("--steps"), required=True, help="total steps the schedule spans")
    t.add_argument("--until", type=_positive("--until"), default=None, help="stop this call at this step")
    t.add_argument("--threads", type=_positive("--threads"), default=None, help="CPU threads (torch.set_num_threads)")
    t.add_argument("--batch-size", type=_positive("--batch-size"), default=TrainConfig.batch_size)
    t.add_argument("--lr", type=number("--lr", 1e-8, 1.0), default=TrainConfig.lr)
    t.add_argument("--seed", type=number("--seed", 0, 2**63 - 1, integer=True), default=0)
    t.add_argument("--save-every", type=_positive("--save-every"), default=250)
    t.add_argument("--sample-every", type=_positive("--sample-every"), default=1000)
    t.add_argument("--log-every", type=_positive("--log-every"), default=50)
    t.add_argument("--no-resume", action="store_true", help="start over even if OUT has a train state")
    _device_arg(t)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train_diffusers)


def _card(model: Path):
    """The folder's ModelCard with what the folder commands need (dataset, reference, null_class); one-line
    errors for a missing, invalid or incomplete lafq.json."""
    from .card import CARD_FILE, ModelCard

    path = Path(model) / CARD_FILE
    if not (path.exists() or path.is_symlink()):
        raise ValueError(f"{model} has no {CARD_FILE}: the model card beside the model (train and train-diffusers "
                         "write it; see docs/any-model.md for its keys)")
    return ModelCard.read(model).require("dataset", "reference", "null_class", folder=model)


def load_folder(model: Path, subfolder: str | None = None):
    """`load_diffusers(model)` with one-line errors (diffusers missing, or a folder it cannot read), replaying its
    class labels as conditioning with the lafq.json's null class (train-diffusers folders)."""
    try:
        from .models import load

        return load(model, subfolder=subfolder)
    except ImportError:
        raise ValueError("diffusers models need diffusers: pip install -r requirements.txt") from None
    except OSError as e:
        raise ValueError(f"cannot load {model}: {str(e).splitlines()[0]}") from None


REGISTER = [register]
