"""Paired evaluation of plans against FP32, one (plan, seed) at a time, resumable from disk.

Every plan samples from the same noise per seed as FP32 (one CPU generator seeded with the seed),
so each seed gives per-image pairs: fidelity to FP32 (metrics.Fidelity) and a paired FID
difference. A finished (plan, seed) is a JSON record in the cache directory, keyed by everything it
depends on (weights, plan, sampling spec, backend, reference; for a model other than the project U-Net also
its schedule and class count); a later run finds it and skips the work, so an
evaluation of many hours can be spread over several sittings. FP32 images per seed are kept beside
them (`.npy`, regenerated when absent: sampling is deterministic for a given seed and machine).
The device is not in the key: every record names its device and machine, and the report lists each
machine its records came from, so a table resumed on another machine says so.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_bytes
from .metrics import classifier_accuracy, fidelity, frechet_distance, reference_statistics, statistics
from .pipeline import SampleSpec, as_denoiser, generate
from .policy import Plan
from .quantize import quantize


def machine() -> str:
    """This machine in one line (CPU model or GPU, cores, threads, torch): recorded with every number."""
    from .device import machine_info

    m = machine_info()
    gpu = f", {m['gpu']}" if m["gpu"] else ""
    return f"{m['cpu']} ({m['cores']} cores, {m['threads']} threads){gpu}, torch {m['torch']}"


def plan_digest(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(sorted(plan.precisions.items())).encode()).hexdigest()[:16]


@dataclass
class Evaluator:
    """Samples plans of one FP32 model (a lafq.models.Denoiser, or the project U-Net) and scores them against
    FP32 from the same noise (lafq.pipeline.generate)."""
    model: object
    classifier: torch.nn.Module | None  # None: pixel fidelity only (no feature distance, agreement or accuracy)
    backend: object | None  # FID feature backend; None: fidelity only (no FID)
    cache_dir: Path
    reference: str = "mnist-train5k"
    device: str = "cpu"
    log: object = print
    cached_only: bool = False  # record() returns None instead of sampling what is not on disk yet
    stats_dir: str | Path | None = None  # where the reference statistics are cached (None: checkpoints/stats)
    # (rank, world) under torch.distributed: the k-th record asked for is sampled by rank k mod world only (the
    # others get None for it unless it is on disk already), so ranks that ask for the same records in the same
    # order split them without talking; rank 0 then reads them all back (cached_only).
    shard: tuple[int, int] = (0, 1)
    clip: bool = True  # x0 clipped to [-1, 1] at each step (pixel models); a latent model's scheduler says no

    def __post_init__(self):
        from .checkpoint import state_digest

        from .fisher import classes_of

        self.cache_dir = Path(self.cache_dir)
        self.den = as_denoiser(self.model)
        self._model_digest = state_digest(self.den.module)
        self.num_classes = len(classes_of(self.den))
        self._foreign = self.den.source.get("library") != "lafq"  # its schedule and classes go into the keys
        stats = {} if self.stats_dir is None else {"cache_dir": self.stats_dir}
        self._ref_stats = reference_statistics(self.backend, self.reference, **stats) if self.backend is not None else None
        self._fp32_images: dict[str, torch.Tensor] = {}
        self._cpu_model = copy.deepcopy(self.den.module).cpu()  # what each plan quantizes a copy of
        self._asked = 0  # records asked for so far: the shard key
        self._conditioning_digest = _conditioning_digest(self.den)

    def _generate(self, module: torch.nn.Module, spec: SampleSpec) -> torch.Tensor:
        return generate(replace(self.den, module=module), spec, device=self.device, clip=self.clip)[0]

    def _key(self, what: str, plan: Plan | None, spec: SampleSpec) -> str:
        parts = {"model": self._model_digest, "plan": plan_digest(plan) if plan else "fp32", "spec": asdict(spec),
                 **({} if self.clip else {"clip": False}),
                 "backend": [self.backend.name, self.backend.digest] if self.backend else None,
                 "reference": self.reference, "what": what}
        if self._foreign:  # another model: its schedule and classes too (the U-Net's keys stay as they were)
            parts["sampling"] = [self.num_classes, hashlib.sha256(self.den.schedule.betas.double().numpy().tobytes())
                                 .hexdigest()[:16]]
            if self._conditioning_digest is not None:  # captions / captured rows: what the samples are conditioned on
                parts["conditioning"] = self._conditioning_digest
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]

    def fp32_images(self, spec: SampleSpec) -> torch.Tensor:
        key = self._key("images", None, spec)
        if key not in self._fp32_images:
            path = self.cache_dir / f"fp32-images-{key}.npy"
            if path.is_file():
                images = torch.from_numpy(np.load(path))
            else:
                images = self._generate(self.den.module, spec)
                buf = io.BytesIO()
                np.save(buf, images.numpy())
                atomic_write_bytes(path, buf.getvalue())
            self._fp32_images = {key: images}  # one seed's images at a time: N = 5,000 is 4 MB each
        return self._fp32_images[key]

    def record(self, name: str, plan: Plan | None, spec: SampleSpec, extra: dict | None = None) -> dict | None:
        """One (plan, seed): FID (when a backend is set), accuracy, fidelity to FP32; cached on disk."""
        what = "fid+fidelity" if self.backend is not None else "fidelity" if self.classifier is not None else "pixels"
        path = self.cache_dir / f"{what}-{self._key(what, plan, spec)}.json"
        k, self._asked = self._asked, self._asked + 1
        if path.is_file():
            rec = _cached_record(path, self.backend is not None, self.classifier is not None)
            rec["name"] = name  # the same plan may appear under another row name
            return rec
        if self.cached_only or k % self.shard[1] != self.shard[0]:
            return None
        t0 = time.perf_counter()
        ref = self.fp32_images(spec)
        if plan is None or all(p == "fp32" for p in plan.precisions.values()):
            images = ref
            q = self.den.module
        else:
            # Quantized on the CPU and then moved: the stored weights are the same bits on every device.
            q = quantize(copy.deepcopy(self._cpu_model), plan).to(self.device)
            images = self._generate(q, spec)
        from .pipeline import resolve_labels

        labels = resolve_labels(spec, self.num_classes)
        close = fidelity(ref, images, self.classifier)
        rec = {"name": name, "seed": spec.seed, "n": spec.n, "steps": spec.steps, "sampler": spec.sampler,
               "guidance": spec.guidance, **close.to_dict(), "per_image": close.per_image,
               "accuracy": (classifier_accuracy(self.classifier, images, labels)
                            if labels is not None and self.classifier is not None else None)}
        if self.backend is not None:
            rec["fid"] = frechet_distance(statistics(self.backend.features(images)), self._ref_stats)
            rec["backend"] = self.backend.name
        rec.update(seconds=round(time.perf_counter() - t0, 1), machine=machine(), device=str(self.device),
                   plan_digest=plan_digest(plan) if plan else "fp32", **(extra or {}))
        atomic_write_bytes(path, json.dumps(rec, sort_keys=True).encode())
        del q
        from .distributed import fault_point
        fault_point()
        return rec


def _conditioning_digest(den) -> str | None:
    """A digest of what a model's samples are conditioned on, beyond class labels (which its class count names
    already): captions' encodings or rows captured from a pipeline call, and the unconditional row. None for
    unconditional and class-label models, so their record keys stay as they were."""
    cond = den.conditioning
    if cond is None or set(cond.kwargs) <= {"class_labels"}:
        return None
    h = hashlib.sha256(json.dumps([cond.rows, den.null_row]).encode())

    def walk(prefix, v):
        if isinstance(v, dict):
            for k in sorted(v):
                walk(f"{prefix}.{k}", v[k])
        elif torch.is_tensor(v):
            h.update(prefix.encode())
            h.update(v.detach().cpu().contiguous().double().numpy().tobytes() if v.is_floating_point()
                     else v.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(f"{prefix}={v!r}".encode())
    walk("", cond.kwargs)
    return h.hexdigest()[:16]


RECORD_NUMBERS = ("seed", "n", "steps", "mad", "psnr")
CLASSIFIER_NUMBERS = ("feature_distance", "agreement")


def _cached_record(path: Path, with_fid: bool, with_classifier: bool = True) -> dict:
    """A record the evaluator wrote, checked: a damaged one (edited, or from another version) is one error line
    naming the file, not a KeyError later in the report."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"cached record {path} is not readable JSON ({type(e).__name__}); delete it to measure "
                         "that row again") from None
    need = RECORD_NUMBERS + (CLASSIFIER_NUMBERS if with_classifier else ()) + (("fid",) if with_fid else ())
    bad = [k for k in need if not isinstance(rec, dict) or isinstance(rec.get(k), bool)
           or not isinstance(rec.get(k), (int, float)) or not math.isfinite(rec[k])] if isinstance(rec, dict) else ["all"]
    if bad:
        raise ValueError(f"cached record {path} is damaged (missing or not a finite number: {', '.join(bad[:4])}); "
                         "delete it to measure that row again")
    return rec
