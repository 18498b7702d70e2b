"""Glue between a denoiser and its outputs: batched generation and FID / accuracy over seeds.

Works for any denoiser (the FP32 U-Net or a quantized one), so every comparison runs the
same code path with the same noise.
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
from .diffusion import DEFAULT_GUIDANCE, Schedule, ddim_sample, ddpm_sample, linear_schedule, to_uint8
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
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {self.sampler!r}; choose 'ddim' or 'ddpm'")
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


def generate(denoiser, spec: SampleSpec, *, num_classes: int = 10, schedule: Schedule | None = None, device="cpu",
             progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generate spec.n images; returns (uint8 (n, 1, 28, 28), labels or None).

    One CPU generator seeded with spec.seed draws all noise, batch after batch.
    `progress(done, total)` counts denoising steps over all batches.
    """
    schedule = schedule or linear_schedule()
    labels = resolve_labels(spec, num_classes)
    gen = torch.Generator().manual_seed(spec.seed)
    per_batch = spec.steps if spec.sampler == "ddim" else schedule.T
    batches = range(0, spec.n, spec.batch_size)
    total = per_batch * len(batches)
    out = []
    with hold_dequantized(denoiser):  # a quantized model dequantizes once per call, not once per step
        for b, start in enumerate(batches):
            n = min(spec.batch_size, spec.n - start)
            y = labels[start:start + n] if labels is not None else None
            cb = (lambda i, _t, b=b: progress(b * per_batch + i, total)) if progress else None
            kw = dict(labels=y, guidance=spec.guidance, null_class=num_classes, generator=gen, device=device, callback=cb)
            if spec.sampler == "ddim":
                x = ddim_sample(denoiser, schedule, n, steps=spec.steps, eta=spec.eta, **kw)
            else:
                x = ddpm_sample(denoiser, schedule, n, **kw)
            out.append(to_uint8(x).cpu())
    return torch.cat(out), labels


def seed_result_key(denoiser, spec: SampleSpec, backend, classifier, reference: str) -> str:
    """What one seed's FID depends on: weights (and plan), everything in the spec, backend and reference."""
    from .checkpoint import state_digest

    denoiser = getattr(denoiser, "_orig_mod", denoiser)  # torch.compile'd: the weights are the original's
    plan = getattr(denoiser, "lafq_plan", None)
    parts = {"model": state_digest(denoiser), "plan": sorted(plan.precisions.items()) if plan else None,
             "spec": spec.__dict__, "backend": [backend.name, getattr(backend, "digest", "")],
             "classifier": state_digest(classifier) if classifier is not None else None, "reference": reference}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def evaluate_fid(denoiser, spec: SampleSpec, seeds: list[int], *, backend=None, classifier=None, num_classes: int = 10,
                 reference: str = "mnist-train5k", device="cpu", progress=None, log=None,
                 cache_dir: str | Path | None = None, schedule: Schedule | None = None,
                 stats_dir: str | Path | None = None) -> FIDResult:
    """FID (and classifier accuracy for conditional samples) of spec.n samples, once per seed.

    With `cache_dir`, each finished seed is written there as JSON (keyed by `seed_result_key`) and
    found again by a later call, so an hours-long evaluation can be split over several runs.
    `schedule`: the model's noise schedule (default: the project's linear one); `stats_dir`: where the
    reference statistics are cached (default: checkpoints/stats).
    """
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
        images, labels = generate(denoiser, s, num_classes=num_classes, schedule=schedule, device=device, progress=prog)
        result.values.append(frechet_distance(statistics(backend.features(images)), ref))
        if classifier is not None and labels is not None:
            result.accuracy.append(classifier_accuracy(classifier, images, labels))
        if cached is not None:
            acc = result.accuracy[-1] if classifier is not None and labels is not None else None
            atomic_write_bytes(cached, json.dumps({"fid": result.values[-1], "accuracy": acc, "seed": seed,
                                                   "backend": backend.name, "n": spec.n, "spec": s.__dict__,
                                                   "device": str(device),
                                                   "seconds": round(time.perf_counter() - t0, 1)}, default=str).encode())
        if log:
            log(f"seed {seed}: FID {result.values[-1]:.3f} ({backend.name}, N={spec.n})"
                + (f", accuracy {100 * result.accuracy[-1]:.2f}%" if result.accuracy else "")
                + f" in {time.perf_counter() - t0:.0f}s")
    return result


def _stats_kw(stats_dir) -> dict:
    return {} if stats_dir is None else {"cache_dir": stats_dir}


def real_floor(backend, n: int, seeds: list[int], *, train: str = "mnist-test10k", reference: str = "mnist-train5k",
               stats_dir: str | Path | None = None) -> FIDResult:
    """FID of n real training images against the held-out reference: the best a model could score."""
    from .data import load_dataset

    images = torch.from_numpy(load_dataset(train).images)
    ref = reference_statistics(backend, reference, **_stats_kw(stats_dir))
    feats = backend.features(images)
    result = FIDResult(backend=backend.name, n=n, values=[], reference=reference)
    for seed in seeds:
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        result.values.append(frechet_distance(statistics(feats[idx.numpy()]), ref))
    return result
