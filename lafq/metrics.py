"""FID and friends, as a chain of small functions: images -> features -> statistics -> distance.

Two feature backends:
    classifier   the project's MNIST classifier, penultimate 128-d features (offline default)
    inception    pytorch-fid's InceptionV3 pool3 (2048-d), when its weights are present: in the
                 torch hub cache, at LAFQ_INCEPTION_WEIGHTS / a given path, or downloadable.
Every FID is reported with its backend and N (`FIDResult.describe`).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import paths
from .checkpoint import atomic_write_bytes
from .classifier import MnistClassifier, load_classifier, uint8_to_input

REPO = paths.REPO
DEFAULT_CLASSIFIER = paths.CLASSIFIER
STATS_DIR = paths.STATS
BACKENDS = ("auto", "classifier", "inception")


class ClassifierBackend:
    name = "classifier"

    def __init__(self, model: MnistClassifier | None = None, path=DEFAULT_CLASSIFIER):
        from .checkpoint import state_digest

        self.model = model if model is not None else load_classifier(path)[0]
        self.digest = state_digest(self.model)  # reference statistics are cached per weights

    @torch.inference_mode()
    def features(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        """images: uint8 (N, [1,] 28, 28) -> float64 (N, 128)."""
        x = uint8_to_input(images)
        return torch.cat([self.model.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def inception_weights_path(path: str | os.PathLike | None = None) -> Path | None:
    """Where pytorch-fid's Inception weights are on disk, or None (also where pytorch-fid is not installed)."""
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL
    except ImportError:
        return None

    from .data import system_data_allowed

    candidates = [path, os.environ.get("LAFQ_INCEPTION_WEIGHTS")]
    if system_data_allowed():  # LAFQ_SYSTEM_DATA=0: torch hub's cache is outside the repo, hidden like the datasets
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[-1])
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


@contextmanager
def _weights_from(path: Path):
    """Make pytorch-fid read its weights from `path` instead of its URL."""
    import pytorch_fid.inception as inc

    original = inc.load_state_dict_from_url
    inc.load_state_dict_from_url = lambda *a, **k: torch.load(path, map_location="cpu", weights_only=True)
    try:
        yield
    finally:
        inc.load_state_dict_from_url = original


class InceptionBackend:
    name = "inception"

    def __init__(self, weights: str | os.PathLike | None = None, device="cpu", allow_download: bool = False):
        try:
            from pytorch_fid.inception import InceptionV3
        except ImportError:
            raise ValueError("the Inception backend needs pytorch-fid (pip install -r requirements.txt); "
                             "--backend classifier works without it") from None

        path = inception_weights_path(weights)
        if path is None and not allow_download:
            raise FileNotFoundError("pytorch-fid Inception weights not found (looked at LAFQ_INCEPTION_WEIGHTS and the "
                                    f"torch hub cache {torch.hub.get_dir()}/checkpoints); use --backend classifier "
                                    "offline, or download pt_inception-2015-12-05-6726825d.pth there")
        self.device = device
        if path is None:
            self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        else:
            with _weights_from(path):
                self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        self.model = self.model.eval().to(device)
        self.digest = "pt_inception-2015-12-05"

    @torch.inference_mode()
    def features(self, images: torch.Tensor, batch_size: int = 50) -> np.ndarray:
        if images.dim() == 3:
            images = images[:, None]
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].float().div(255).expand(-1, 3, -1, -1).to(self.device)
            out.append(self.model(x)[0].squeeze(-1).squeeze(-1).double().cpu())
        return torch.cat(out).numpy()


def get_backend(name: str = "auto", **kw):
    """'auto' picks Inception where its weights are on disk, else the offline classifier."""
    if name == "auto":
        name = "inception" if inception_weights_path(kw.get("weights")) else "classifier"
    if name == "classifier":
        return ClassifierBackend(**{k: v for k, v in kw.items() if k in ("model", "path")})
    if name == "inception":
        return InceptionBackend(**{k: v for k, v in kw.items() if k in ("weights", "device", "allow_download")})
    raise ValueError(f"unknown FID backend {name!r}; choose one of {BACKENDS}")


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N, D) features."""
    if len(features) < 2:
        raise ValueError(f"FID statistics need at least 2 samples, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(stats_a, stats_b) -> float:
    """pytorch-fid's Frechet distance; where the installed SciPy breaks it, or pytorch-fid is not installed
    (a GPU image without it, say), the same formula here."""
    # Imported here: pytorch_fid pulls in torchvision and scipy, over a second of the app's cold start.
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
    except ImportError:
        return _frechet_distance(*stats_a, *stats_b)

    try:
        return float(calculate_frechet_distance(stats_a[0], stats_a[1], stats_b[0], stats_b[1]))
    except TypeError as e:  # pytorch-fid 0.3.0 passes sqrtm(disp=False), which newer SciPy no longer takes
        if "disp" not in str(e):
            raise
        return _frechet_distance(*stats_a, *stats_b)


def _frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), with pytorch-fid's guards for a near-singular product."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def reference_statistics(backend, dataset: str = "mnist-train5k", cache_dir=STATS_DIR, data_root=None):
    """Statistics of a whole real dataset, cached to `<cache_dir>/<dataset>-<backend>-<weights digest>.npz`."""
    from .data import load_dataset

    path = Path(cache_dir) / f"{dataset}-{backend.name}-{backend.digest}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["mu"], z["sigma"]
    mu, sigma = statistics(backend.features(torch.from_numpy(load_dataset(dataset, data_root).images)))
    import io

    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma)
    atomic_write_bytes(path, buf.getvalue())
    return mu, sigma


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a two-sided 95% Student-t interval (0 for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), 0.0
    from scipy.stats import t

    return float(v.mean()), float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


@dataclass
class FIDResult:
    backend: str
    n: int
    values: list[float]  # one FID per seed
    reference: str = "mnist-train5k"
    accuracy: list[float] = field(default_factory=list)  # classifier accuracy per seed, when conditional

    @property
    def mean(self) -> float:
        return mean_ci95(self.values)[0]

    @property
    def ci95(self) -> float:
        return mean_ci95(self.values)[1]

    def describe(self) -> str:
        s = f"FID {self.mean:.3f} ± {self.ci95:.3f} (95% CI over {len(self.values)} seeds; backend={self.backend}, N={self.n}, reference={self.reference})"
        if self.accuracy:
            s += f"; classifier accuracy {100 * np.mean(self.accuracy):.2f}%"
        return s

    def to_dict(self) -> dict:
        d = {"backend": self.backend, "n": self.n, "reference": self.reference, "fid_values": self.values,
             "fid_mean": self.mean, "fid_ci95": self.ci95}
        if self.accuracy:
            d["accuracy_values"] = self.accuracy
            d["accuracy_mean"] = float(np.mean(self.accuracy))
        return d


def classifier_accuracy(classifier: MnistClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of uint8 images the classifier assigns to their requested labels."""
    from .classifier import predict

    return float((predict(classifier, uint8_to_input(images)) == labels.cpu()).float().mean())


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    """0,1,..,9,0,1,.. : n labels with every class as equally often as possible."""
    return torch.arange(n) % num_classes


# -- fidelity to a reference model (same noise) ---------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """One declaration per metric: its record field, label, display scale and unit, and direction."""
    name: str  # the field in every record (lafq.evaluate) and report CSV
    label: str
    scale: float  # shown as value × scale ...
    unit: str  # ... with this unit
    lower_is_better: bool
    fidelity: bool  # measured image by image against FP32's images from the same noise
    digits: int = 3

    def show(self, v: float) -> str:
        return f"{self.scale * v:.{self.digits}f}"


METRICS = {m.name: m for m in (
    Metric("fid", "FID", 1, "", True, False),
    Metric("mad", "mean |Δ| / 255", 1000, " ‰", True, True),  # per mille of the pixel range
    Metric("psnr", "PSNR dB", 1, " dB", False, True),
    Metric("feature_distance", "feature distance", 100, " %", True, True),
    Metric("agreement", "class agreement", 100, " pp", False, True, digits=2),
    Metric("accuracy", "class accuracy", 100, " %", False, False, digits=2),
)}
FIDELITY = tuple(n for n, m in METRICS.items() if m.fidelity)
FIDELITY_LABELS = {n: METRICS[n].label for n in FIDELITY}
PSNR_CAP = 100.0  # dB for identical images: keeps per-seed means and intervals finite


@dataclass(frozen=True)
class Fidelity:
    """How close images are to reference images drawn from the same noise, image by image.

    mad               mean |Δ| over pixels and images, on the 0..1 scale (|Δ| / 255)
    psnr              10 log10(255² / MSE), MSE over all pixels of all images (capped at PSNR_CAP)
    feature_distance  mean ‖f(x) − f(ref)‖ / mean ‖f(ref)‖ over the classifier's 128-d features
    agreement         fraction of images the classifier puts in the same class as their reference
    Without a classifier (a model that ships none) the last two are None: pixel fidelity only.
    """
    mad: float
    psnr: float
    feature_distance: float | None
    agreement: float | None
    # Each image's own values, for tests over images (lafq.report.image_level): "mad", its mean |Δ| on the 0..1
    # scale (7 decimals), and "agree", one character per image, "1" where it keeps its reference's class.
    per_image: dict | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in FIDELITY}


@torch.inference_mode()
def fidelity(reference: torch.Tensor, images: torch.Tensor, classifier: MnistClassifier | None,
             batch_size: int = 500) -> Fidelity:
    """Fidelity of uint8 `images` to uint8 `reference` (same shape, image i paired with image i); with no
    classifier, the pixel measures only (mean |Δ| and PSNR, any channel count and size)."""
    if reference.shape != images.shape:
        raise ValueError(f"fidelity pairs images one to one: shapes {tuple(reference.shape)} and {tuple(images.shape)}")
    d = images.double() - reference.double()
    mse = float(d.pow(2).mean())
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse))
    mad_per_image = [round(float(v), 7) for v in d.abs().flatten(1).mean(1) / 255]
    if classifier is None:
        return Fidelity(float(d.abs().mean() / 255), psnr, None, None, {"mad": mad_per_image})
    classifier.eval()

    def feats(x):
        x = uint8_to_input(x)
        return torch.cat([classifier.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    fr, fi = feats(reference), feats(images)
    dist = float((fi - fr).double().norm(dim=1).mean() / fr.double().norm(dim=1).mean().clamp_min(1e-12))
    same = (classifier.out(fi).argmax(1) == classifier.out(fr).argmax(1)).tolist()
    per_image = {"mad": mad_per_image, "agree": "".join("1" if a else "0" for a in same)}
    return Fidelity(float(d.abs().mean() / 255), psnr, dist, sum(same) / len(same), per_image)

