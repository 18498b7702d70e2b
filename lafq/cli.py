"""`python -m lafq <command>`: train, train-classifier, sample, fid, fisher, quantize, report, bench, space, ...

Every command takes --json to print one machine-readable result line on stdout (human
messages go to stderr then). Errors print one line saying what was wrong and exit 2 (numbers that are
NaN, infinite or out of range included); Ctrl-C prints "interrupted" and exits 130. No traceback for
bad input, unreadable or unwritable paths, or interruption.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from . import paths
from .cliutil import MAX_GUIDANCE, CLIError, number
from .cliutil import device_arg as _device_arg
from .cliutil import emit as _emit
from .cliutil import log_to as _log
from .cliutil import positive as _positive
from .checkpoint import CheckpointError
from .data import DataError
from .diffusion import DEFAULT_GUIDANCE

DEFAULT_CKPT = str(paths.UNET)


def _classes(text: str | None) -> tuple[int, ...] | None:
    """'7' -> (7,), '0,1,2' -> (0,1,2), 'none' -> () (unconditional), None -> balanced 0..9."""
    if text is None:
        return None
    if text.strip().lower() in ("none", "uncond", "unconditional"):
        return ()
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise CLIError(f"--classes takes digits like '7' or '0,1,2', or 'none' for unconditional; got {text!r}") from None


def _sampling_args(p):
    from .cli_quant import compute_arg, model_arg

    model_arg(p)  # a U-Net or quantized model .safetensors, or a diffusers folder
    compute_arg(p)
    p.add_argument("--steps", type=_positive("--steps"), default=50, help="DDIM steps (DDPM always uses all T)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--eta", type=number("--eta", 0, 1), default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 ancestral")
    p.add_argument("--guidance", type=number("--guidance", 0, MAX_GUIDANCE), default=None,
                   help=f"classifier-free guidance scale (default: the model card's, else {DEFAULT_GUIDANCE:g})")
    p.add_argument("--classes", default=None,
                   help="'7', '0,1,2' or 'none' (unconditional); default: the model's classes in turn")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=128)
    _device_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON result line")


def _model_on(model, args):
    """Move a U-Net or quantized model to --device (FP32 without TF32 on a GPU); returns (model, device)."""
    from .device import resolve_device, strict_fp32

    device = resolve_device("cpu" if args.device == "auto" and getattr(args, "compute", "dequantize") != "dequantize"
                            else args.device)  # the integer compute modes are CPU kernels
    if getattr(args, "command", None) in ("fid", "fid-model"):  # fid splits its seeds under torchrun: this rank's device
        from .distributed import init_from_env
        device = init_from_env(device)
    strict_fp32(device)
    return model.to(device), device  # a quantized model's stored forms move with it


def _spec(args, n: int, seed: int, card=None):
    from .pipeline import SampleSpec

    default = card.guidance if card is not None and card.null_class is not None else DEFAULT_GUIDANCE
    return SampleSpec(n=n, labels=_classes(args.classes), steps=args.steps, sampler=args.sampler, eta=args.eta,
                      guidance=default if args.guidance is None else args.guidance, seed=seed,
                      batch_size=args.batch_size)


def cmd_train(args):
    from .device import resolve_device
    from .model import UNetConfig
    from .train import TrainConfig, train

    cfg = TrainConfig(dataset=args.dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      save_every=args.save_every, sample_every=args.sample_every, log_every=args.log_every)
    mcfg = UNetConfig(base_channels=args.base_channels)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    rec = train(args.out, cfg, mcfg, resume=not args.no_resume, progress=not args.json, until=args.until, device=device)
    res = {"command": "train", "out": str(args.out), **rec, "device": str(device),
           "seconds_this_call": round(time.perf_counter() - t0, 1)}
    _emit(args, res, f"trained to step {rec['step']} (loss {rec.get('loss', float('nan')):.4f}); wrote {args.out}/unet.safetensors")


def cmd_train_classifier(args):
    """The FID backend's classifier: trained on one split, its accuracy measured on a disjoint one."""
    from .classifier import predict, save_classifier, train_classifier
    from .data import load_dataset

    x, y = load_dataset(args.dataset).tensors()
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    t0 = time.perf_counter()
    model = train_classifier(x, y, epochs=args.epochs, lr=args.lr, seed=args.seed, log=_log(args))
    seconds = time.perf_counter() - t0
    hx, hy = load_dataset(args.heldout).tensors()
    acc = float((predict(model, hx) == hy).float().mean())
    train = {"dataset": args.dataset, "images": len(x), "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
             "heldout": args.heldout, "heldout_accuracy": round(acc, 4), "wall_seconds": round(seconds, 1)}
    save_classifier(args.out, model, train)
    _emit(args, {"command": "train-classifier", "out": str(args.out), **train},
          f"wrote {args.out}: held-out accuracy {100 * acc:.2f}% on {args.heldout} ({seconds:.0f} s)")


def cmd_sample(args):
    from .pipeline import generate
    from .train import save_grid

    from .cli_quant import load_model_arg

    m = load_model_arg(args)  # the U-Net (FP32 or quantized), or a diffusers folder with its classes (lafq.json)
    spec = _spec(args, args.n, args.seed, m.card)
    _, device = _model_on(m.den.module, args)
    t0 = time.perf_counter()
    images, labels = generate(m.den, spec, device=device)
    dt = time.perf_counter() - t0
    nrow = args.nrow or max(1, int(round(args.n ** 0.5)))
    save_grid(images.float() / 127.5 - 1, args.out, nrow=nrow)
    res = {"command": "sample", "out": str(args.out), "n": args.n, "seed": args.seed, "steps": spec.steps,
           "sampler": spec.sampler, "guidance": spec.guidance, "seconds": round(dt, 3), "device": str(device),
           "compute": args.compute,
           "labels": labels.tolist() if labels is not None else None}
    _emit(args, res, f"wrote {args.out}: {args.n} images, {spec.sampler}-{spec.steps if spec.sampler == 'ddim' else 1000}, "
                     f"guidance {spec.guidance}, seed {args.seed}, {dt:.1f}s on {device}")


def _fid_subject(args):
    """(backend, classifier, reference, stats_dir, floor images, card, folder) for --model, the same for every model:
    the card and files beside it (a model file's folder: checkpoints/ for the shipped U-Net; a model folder itself):
    lafq.json's reference and dataset, classifier.safetensors (or --classifier) for accuracy and, with --backend
    auto, the FID features where Inception's weights are not on disk; stats/ (or --stats-dir) for the cached
    reference statistics. `folder` is the model folder (None for a model file)."""
    from .classifier import load_classifier
    from .cli_diffusers import _card
    from .metrics import get_backend

    p = Path(args.model or DEFAULT_CKPT)
    if p.is_dir():
        home, folder = p, p
    elif p.is_file() or p.suffix == ".safetensors":
        home, folder = p.parent, None
    else:
        raise ValueError(f"fid scores a lafq .safetensors U-Net or a model folder with its classifier and lafq.json; "
                         f"{args.model} is neither (download a Hub model into a folder with both)")
    card = _card(home)  # one-line errors for a missing or incomplete lafq.json
    classifier = Path(args.classifier) if args.classifier else home / "classifier.safetensors"
    if not classifier.is_file():
        raise ValueError(f"no classifier for FID features and accuracy: {classifier} is not a file; give --classifier "
                         "FILE (python -m lafq train-classifier writes one)")
    clf = load_classifier(classifier)[0]
    backend = get_backend(args.backend, model=clf)
    return backend, clf, card.reference, args.stats_dir or home / "stats", card.dataset, card, folder


def cmd_fid(args):
    import json as _json

    from . import distributed
    from .checkpoint import atomic_write_bytes
    from .cli_quant import _deprecated, load_model_arg
    from .pipeline import evaluate_fid, real_floor

    _deprecated(args, "fid")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    log = _log(args)
    if args.compute != "dequantize" and (args.compile or args.floor_only):
        raise CLIError(f"--compute {args.compute} does not go with --compile (the compiler traces the dequantize path) "
                       "or --floor-only (no model is sampled): drop one")
    backend, clf, reference, stats_dir, floor_images, card, folder = _fid_subject(args)
    cache = args.cache_dir or (folder / "eval" if folder is not None else None)
    seeds = list(range(args.seed, args.seed + args.seeds))
    res = {"command": "fid", "model": args.model or str(DEFAULT_CKPT), "backend": backend.name, "n": args.n,
           "seeds": seeds, "reference": reference, "weights": args.weights, "compute": args.compute}
    lines = []
    if not args.floor_only:
        m = load_model_arg(args)
        spec = _spec(args, args.n, seeds[0], card)
        _, device = _model_on(m.den.module, args)
        den = m.den
        if args.compute == "w8a8":  # which calibration and which float layers: one summary per such pair
            import hashlib
            kept = sorted(k for k, v in den.module.lafq_activations.items() if v == "float")
            res["activations"] = hashlib.sha256(json.dumps([den.module.lafq_activation_ranges, kept]).encode()
                                                ).hexdigest()[:16]
            res["float_activations"] = kept
        if args.compile:  # 46-100 s of compilation in a first process, seconds in later ones (lafq/compile_cache.py)
            from dataclasses import replace

            from .compile_cache import compile_model
            den = replace(den, module=compile_model(den.module))
        if not distributed.is_main():
            log = lambda m: None  # noqa: E731 -- rank 0 speaks for the run
        log(f"FID: {args.n} samples x {len(seeds)} seeds, {spec.sampler}-{spec.steps}, guidance {spec.guidance}, "
            f"backend {backend.name}, reference {reference}, sampling on {device}")
        fid = lambda seeds, log=log: evaluate_fid(  # noqa: E731
            den, spec, seeds, backend=backend, classifier=clf, reference=reference, log=log, cache_dir=cache,
            stats_dir=stats_dir, device=device)
        if distributed.world() > 1:  # under torchrun: seed i on rank i mod K, results shared through the cache
            if cache is None:
                raise ValueError("fid under torchrun shares each rank's seeds through --cache-dir: give one")
            fid(seeds[distributed.rank()::distributed.world()])
            distributed.barrier()
            if not distributed.is_main():
                distributed.finish()
                return
        r = fid(seeds)  # on one process all; under torchrun rank 0 reads every rank's seeds back
        distributed.finish()
        res.update(r.to_dict(), steps=spec.steps, sampler=spec.sampler, guidance=spec.guidance, device=str(device))
        lines.append(r.describe())
    if args.real_floor or args.floor_only:
        f = real_floor(backend, args.n, seeds, train=floor_images, reference=reference, stats_dir=stats_dir)
        res["real_floor"] = {**f.to_dict(), "train": floor_images}
        lines.append(f"real-vs-real floor ({floor_images} draws vs {reference}): " + f.describe())
    if cache is not None:  # the summary beside the per-seed results
        name = "floor" if args.floor_only else f"fid-n{args.n}-ddim{args.steps}-w{res.get('guidance', 0):g}" + (
            f"-{Path(args.weights).stem}" if args.weights else "") + (  # a quantized model's summary beside FP32's
            f"-{args.compute}" + (f"-{res['activations'][:8]}" if args.compute == "w8a8" else "")
            if args.compute != "dequantize" else "")  # and its integer-kernel runs beside it, per calibration
        atomic_write_bytes(Path(cache) / f"{name}.json", (_json.dumps(res, indent=2, sort_keys=True) + "\n").encode())
        lines.append(f"wrote {Path(cache) / (name + '.json')}")
    _emit(args, res, "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lafq", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .train import TrainConfig  # the training defaults live there; the CLI repeats none of them

    t = sub.add_parser("train", help="train the diffusion U-Net (resumes from OUT if a train state is there)")
    t.add_argument("--dataset", default="mnist-test10k", help="mnist-test10k (offline), mnist-train, fashion-train, ...")
    t.add_argument("--steps", type=_positive("--steps"), default=TrainConfig.steps, help="total steps the schedule spans")
    t.add_argument("--until", type=_positive("--until"), default=None, help="stop this call at this step")
    t.add_argument("--batch-size", type=_positive("--batch-size"), default=TrainConfig.batch_size)
    t.add_argument("--lr", type=number("--lr", 1e-8, 1.0), default=TrainConfig.lr)
    t.add_argument("--base-channels", type=_positive("--base-channels"), default=32)
    t.add_argument("--seed", type=number("--seed", 0, 2**63 - 1, integer=True), default=0)
    t.add_argument("--save-every", type=_positive("--save-every"), default=TrainConfig.save_every)
    t.add_argument("--sample-every", type=_positive("--sample-every"), default=TrainConfig.sample_every)
    t.add_argument("--log-every", type=_positive("--log-every"), default=TrainConfig.log_every)
    t.add_argument("--no-resume", action="store_true", help="start over even if OUT has a train state")
    _device_arg(t)
    t.add_argument("--out", type=Path, default=Path("checkpoints"))
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate a grid of digits (or of a train-diffusers model's classes)")
    _sampling_args(s)
    s.add_argument("--n", type=_positive("--n"), default=16)
    s.add_argument("--seed", type=number("--seed", 0, 2**63 - 1, integer=True), default=0)
    s.add_argument("--nrow", type=_positive("--nrow"), default=None)
    s.add_argument("--out", type=Path, default=Path("grid.png"))
    s.set_defaults(func=cmd_sample)

    f = sub.add_parser("fid", aliases=["fid-model"],
                       help="FID (mean and 95%% CI over seeds) and classifier accuracy of any model")
    _sampling_args(f)
    f.add_argument("--n", type=_positive("--n"), default=1000, help="samples per seed")
    f.add_argument("--seeds", type=_positive("--seeds"), default=3, help="number of sampling seeds")
    f.add_argument("--seed", type=number("--seed", 0, 2**63 - 1, integer=True), default=0, help="first seed")
    f.add_argument("--backend", choices=("auto", "classifier", "inception"), default="auto")
    f.add_argument("--real-floor", action="store_true", help="also print the real-vs-real FID at the same backend and N")
    f.add_argument("--floor-only", action="store_true", help="only the real-vs-real floor (no sampling)")
    f.add_argument("--compile", action="store_true", help="torch.compile the model first (cached in $LAFQ_CACHE_DIR or ~/.cache/lafq: "
                   "only the first process waits for the compiler)")
    f.add_argument("--cache-dir", "--out-dir", dest="cache_dir", type=Path, default=None,
                   help="keep each finished seed's result (and the summary) here and reuse it: a long run can be split "
                        "over sessions (default: MODEL/eval for a model folder)")
    f.add_argument("--classifier", type=Path, default=None,
                   help="FID features and accuracy (default: the shipped MNIST classifier; MODEL/classifier.safetensors)")
    f.add_argument("--stats-dir", type=Path, default=None,
                   help="reference statistics cache (default: checkpoints/stats; MODEL/stats)")
    f.add_argument("--threads", type=_positive("--threads"), default=None, help="CPU threads (torch.set_num_threads)")
    f.set_defaults(func=cmd_fid)

    c = sub.add_parser("train-classifier", help="train the MNIST classifier behind the offline FID backend and accuracy")
    c.add_argument("--out", type=Path, required=True, help="where to write it (the shipped one: checkpoints/classifier.safetensors)")
    c.add_argument("--dataset", default="mnist-test10k", help="training split")
    c.add_argument("--heldout", default="mnist-train5k", help="disjoint split its accuracy is measured on")
    c.add_argument("--epochs", type=number("--epochs", 1, 1000, integer=True), default=12)
    c.add_argument("--lr", type=number("--lr", 1e-6, 1), default=3e-3, help="one-cycle peak learning rate")
    c.add_argument("--limit", type=number("--limit", 1, 10**7, integer=True), default=None,
                   help="train on the first N images only (a quick check)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_train_classifier)

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    """Commands whose modules register themselves (kept out of this file so it stays short)."""
    from . import cli_bench, cli_export, cli_quant, cli_diffusers, space

    return cli_quant.REGISTER + cli_bench.REGISTER + space.REGISTER + cli_export.REGISTER + cli_diffusers.REGISTER


def _os_error(e: OSError) -> str:
    """'permission denied: out.png' rather than a traceback (PermissionError, IsADirectoryError, ...)."""
    if e.strerror is None:  # raised with a message of our own ("no such plan file: ...")
        return " ".join(str(e).split())[:500] or type(e).__name__
    what = e.strerror.lower()
    return f"{what}: {e.filename}" if e.filename else what


def _fail(message: str, as_json: bool) -> int:
    """One error line on stderr, exit 2; under --json also the error as the JSON line on stdout, where the
    result would have been."""
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "exit_code": 2}), flush=True)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # argparse refused an argument: its usage line is on stderr
            if e.code == 2 and "--json" in argv:
                print(json.dumps({"error": "invalid arguments (the reason is on stderr)", "exit_code": 2}), flush=True)
            raise
        args.func(args)
    except (CLIError, CheckpointError, DataError, ValueError) as e:
        return _fail(" ".join(str(e).split())[:500], "--json" in argv)
    except OSError as e:  # unreadable input, unwritable output, a directory where a file belongs
        return _fail(_os_error(e), "--json" in argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
