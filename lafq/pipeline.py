"""Glue between a denoiser and its outputs: batched generation and FID / accuracy over seeds.

Works for any denoiser (a `lafq.models.Denoiser`: the project U-Net, a diffusers model, FP32 or quantized),
so every comparison runs the same code path with the same noise: `denoise` / `generate` are the one
sampling entry (`Denoiser.sample`, the app, `sample`, `fid`, `report` all call it).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import paths
from .checkpoint import atomic_write_bytes
from .device import model_device
from .diffusion import DEFAULT_GUIDANCE, ddim_sample, ddim_timesteps, ddpm_sample, flow_sample, to_uint8
from .quantize import hold_dequantized
from .metrics import (FIDResult, balanced_labels, classifier_accuracy, frechet_distance, get_backend,
                      reference_statistics, statistics)

REPO = paths.REPO
DEFAULT_CHECKPOINT = paths.UNET
MAX_BATCH = 256


def load_denoiser(path=DEFAULT_CHECKPOINT):
    """Load an FP32 U-Net or a quantized model of any class (by the file's `kind`); returns (model in eval mode,
    metadata)."""
    from .checkpoint import CheckpointError, load_file, unet_from_file

    tensors, meta = load_file(path)
    if meta.get("kind") == "unet":
        return unet_from_file(tensors, meta, str(path)), meta
    if meta.get("kind") == "quantized":
        from .quantize import quantized_from_file
        return quantized_from_file(tensors, meta, str(path)), meta
    raise CheckpointError(f"{path} holds a {meta.get('kind')!r}; expected a 'unet' or 'quantized' model")


@dataclass(frozen=True)
class SampleSpec:
    """What to generate; the same spec and seed give the same images."""
    n: int = 16
    labels: tuple[int, ...] | None = None  # None: balanced 0..9 when conditional; () : unconditional
    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    batch_size: int = 128

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be in [1, {MAX_BATCH}], got {self.batch_size}")
        if self.sampler not in ("ddim", "ddpm", "euler"):
            raise ValueError(f"unknown sampler {self.sampler!r}; choose 'ddim' or 'ddpm' ('euler' or 'ddim' for a "
                             "flow-matching model)")
        if not (self.guidance == self.guidance) or self.guidance < 0:  # NaN check without math
            raise ValueError(f"guidance must be a number >= 0, got {self.guidance}")


def resolve_labels(spec: SampleSpec, num_classes: int) -> torch.Tensor | None:
    if spec.labels == ():
        return None
    if spec.labels is None:
        return balanced_labels(spec.n, num_classes) if num_classes else None
    labels = torch.as_tensor(spec.labels, dtype=torch.long)
    if ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"class labels must be in [0, {num_classes - 1}], got {spec.labels}")
    if len(labels) != spec.n:  # a short list repeats: --classes 7 --n 16 asks for sixteen 7s
        labels = labels.repeat((spec.n + len(labels) - 1) // len(labels))[:spec.n]
    return labels


def as_denoiser(model):
    """A `lafq.models.Denoiser` as given; the project U-Net (FP32 or quantized) through its adapter."""
    from .model import UNet
    from .models.base import Denoiser

    if isinstance(model, Denoiser):
        return model
    base = getattr(model, "_orig_mod", model)  # torch.compile'd: the original's config, the compiled forward
    if isinstance(base, UNet):
        from dataclasses import replace

        from .models.lafq_unet import from_lafq_unet
        return replace(from_lafq_unet(base), module=model)
    raise TypeError(f"expected a lafq.models.Denoiser or the project U-Net, got {type(model).__name__}: wrap other "
                    "models with lafq.models.from_diffusers (or lafq.load)")


def conditioning_rows(den, spec: SampleSpec) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """(conditioning rows, class labels, guidance) for a spec: labels index the model's classes
    (`lafq.fisher.classes_of`); unconditional samples (labels ()) use the null row where there is one, and
    guidance applies only to class-conditional samples of a model with a null row."""
    from .fisher import classes_of

    classes = classes_of(den)
    if spec.labels == () and den.null_row is None and classes:  # no unconditional row: its classes in turn
        spec = SampleSpec(**{**spec.__dict__, "labels": None})
    labels = resolve_labels(spec, len(classes))
    if labels is None:
        rows = None if den.null_row is None else torch.full((spec.n,), den.null_row, dtype=torch.long)
        return rows, None, 1.0
    rows = torch.as_tensor(classes, dtype=torch.long)[labels]
    return rows, labels, float(spec.guidance) if den.null_row is not None else 1.0


def denoise(model, spec: SampleSpec, *, device=None, clip: bool = True, rows=None,
            progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """spec.n samples of any denoiser (float, (n, *den.sample_shape)) and their class labels (or None).

    The one noise rule: one CPU generator seeded with spec.seed draws all noise, batch after batch, so a seed
    gives the same starting noise on any device and for every plan of a model. `progress(done, total)` counts
    denoising steps over all batches. clip: x0 clipped to [-1, 1] (pixel models; False for latents).
    `rows`: conditioning rows to replay (one per sample, or fewer repeated) instead of spec.labels' classes;
    spec.guidance then applies with the model's null row.
    """
    den = as_denoiser(model)
    den.require_inputs()
    device = model_device(den.module) if device is None else torch.device(device)
    if rows is None:
        rows, labels, guidance = conditioning_rows(den, spec)
    else:
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        rows = rows.repeat((spec.n + len(rows) - 1) // len(rows))[:spec.n]
        labels, guidance = None, float(spec.guidance)
        if guidance != 1.0 and den.null_row is None:
            raise ValueError("guidance needs the unconditional conditioning row (null_row); this model has none")
    eps = den.eps_denoiser()
    gen = torch.Generator().manual_seed(spec.seed)
    flow = den.schedule.flow
    if flow and (spec.sampler == "ddpm" or spec.eta != 0):
        raise ValueError("a flow-matching model samples with its scheduler's Euler steps: sampler 'ddim' or 'euler', "
                         "eta 0")
    if not flow and spec.sampler == "euler":
        raise ValueError("sampler 'euler' is for flow-matching models; this one samples with 'ddim' or 'ddpm'")
    per_batch = spec.steps if flow else len(ddim_timesteps(den.T, spec.steps)) if spec.sampler == "ddim" else den.T
    batches = range(0, spec.n, spec.batch_size)
    total = per_batch * len(batches)
    out = []
    with hold_dequantized(den.module):  # a quantized model dequantizes once per call, not once per step
        for b, start in enumerate(batches):
            n = min(spec.batch_size, spec.n - start)
            cb = (lambda i, _t, b=b: progress(b * per_batch + i, total)) if progress else None
            kw = dict(shape=den.sample_shape, labels=None if rows is None else rows[start:start + n],
                      guidance=guidance, null_class=den.null_row if den.null_row is not None else 0, generator=gen,
                      device=device, clip=clip, callback=cb)
            if flow:  # the deterministic sampler of a flow-matching model is its scheduler's Euler
                kw.pop("clip")
                x = flow_sample(eps, den.schedule, n, steps=spec.steps, **kw)
            elif spec.sampler == "ddim":
                x = ddim_sample(eps, den.schedule, n, steps=spec.steps, eta=spec.eta, **kw)
            else:
                x = ddpm_sample(eps, den.schedule, n, **kw)
            out.append(x)
    return torch.cat(out), labels


def generate(model, spec: SampleSpec, *, device=None, clip: bool = True,
             progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images (n, C, H, W) of any pixel-space denoiser (a Denoiser, or the project U-Net) and their labels;
    the noise rule of `denoise` (clip: its per-step x0 clipping; the output is clamped to [-1, 1] either way)."""
    x, labels = denoise(model, spec, device=device, clip=clip, progress=progress)
    return to_uint8(x).cpu(), labels


def seed_result_key(model, spec: SampleSpec, backend, classifier, reference: str) -> str:
    """What one seed's FID depends on: weights (and plan), everything in the spec, backend and reference."""
    from .checkpoint import state_digest

    module = as_denoiser(model).module
    module = getattr(module, "_orig_mod", module)  # torch.compile'd: the weights are the original's
    plan = getattr(module, "lafq_plan", None)
    parts = {"model": state_digest(module), "plan": sorted(plan.precisions.items()) if plan else None,
             "spec": spec.__dict__, "backend": [backend.name, getattr(backend, "digest", "")],
             "classifier": state_digest(classifier) if classifier is not None else None, "reference": reference}
    compute = getattr(module, "lafq_compute", "dequantize")
    if compute != "dequantize":  # integer kernels give other images: their own seeds (the default keeps its keys)
        parts["compute"] = [compute, getattr(module, "lafq_activation_ranges", None),
                            sorted(getattr(module, "lafq_activations", {}).items())]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def evaluate_fid(model, spec: SampleSpec, seeds: list[int], *, backend=None, classifier=None,
                 reference: str = "mnist-train5k", device=None, progress=None, log=None,
                 cache_dir: str | Path | None = None, stats_dir: str | Path | None = None) -> FIDResult:
    """FID (and classifier accuracy for conditional samples) of spec.n samples of any denoiser (`generate`), once
    per seed.

    With `cache_dir`, each finished seed is written there as JSON (keyed by `seed_result_key`) and
    found again by a later call, so an hours-long evaluation can be split over several runs.
    `stats_dir`: where the reference statistics are cached (default: checkpoints/stats).
    """
    denoiser = as_denoiser(model)
    backend = backend or get_backend("auto")
    ref = reference_statistics(backend, reference, **_stats_kw(stats_dir))
    result = FIDResult(backend=backend.name, n=spec.n, values=[], reference=reference)
    for k, seed in enumerate(seeds):
        s = SampleSpec(**{**spec.__dict__, "seed": seed})
        cached = Path(cache_dir) / f"fid-{seed_result_key(denoiser, s, backend, classifier, reference)}.json" \
            if cache_dir else None
        if cached is not None and cached.exists():
            d = json.loads(cached.read_text())
            result.values.append(d["fid"])
            if d.get("accuracy") is not None:
                result.accuracy.append(d["accuracy"])
            if log:
                log(f"seed {seed}: FID {d['fid']:.3f} ({backend.name}, N={spec.n}) from {cached}")
            continue
        t0 = time.perf_counter()
        prog = (lambda d, t, k=k: progress(k * t + d, len(seeds) * t)) if progress else None
        images, labels = generate(denoiser, s, device=device, progress=prog)
        result.values.append(frechet_distance(statistics(backend.features(images)), ref))
        if classifier is not None and labels is not None:
            result.accuracy.append(classifier_accuracy(classifier, images, labels))
        if cached is not None:
            acc = result.accuracy[-1] if classifier is not None and labels is not None else None
            atomic_write_bytes(cached, json.dumps({"fid": result.values[-1], "accuracy": acc, "seed": seed,
                                                   "backend": backend.name, "n": spec.n, "spec": s.__dict__,
                                                   "device": str(device or model_device(denoiser.module)),
                                                   "seconds": round(time.perf_counter() - t0, 1)}, default=str).encode())
        if log:
            log(f"seed {seed}: FID {result.values[-1]:.3f} ({backend.name}, N={spec.n})"
                + (f", accuracy {100 * result.accuracy[-1]:.2f}%" if result.accuracy else "")
                + f" in {time.perf_counter() - t0:.0f}s")
    return result


def _stats_kw(stats_dir) -> dict:
    return {} if stats_dir is None else {"cache_dir": stats_dir}


def real_floor(backend, n: int, seeds: list[int], *, train: str = "mnist-test10k", reference: str = "mnist-train5k",
               stats_dir: str | Path | None = None, offline: bool = False) -> FIDResult:
    """FID of n real training images against the held-out reference: the best a model could score.
    offline: never download; read `train`'s vendored subset where the split is not installed."""
    from .data import DataError, load_dataset, load_dataset_or_subset

    data = load_dataset_or_subset(train) if offline else load_dataset(train)
    if n > len(data):
        raise DataError(f"{data.name} has {len(data):,} images, fewer than N = {n:,}")
    images = torch.from_numpy(data.images)
    ref = reference_statistics(backend, reference, **_stats_kw(stats_dir))
    feats = backend.features(images)
    result = FIDResult(backend=backend.name, n=n, values=[], reference=reference)
    for seed in seeds:
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        result.values.append(frechet_distance(statistics(feats[idx.numpy()]), ref))
    return result
