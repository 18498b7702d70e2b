"""A small MNIST classifier: scores class-conditional samples and gives the offline FID features.

Its penultimate layer (128-d, after ReLU) is the `classifier` FID backend: it works offline,
where pytorch-fid's InceptionV3 weights cannot be downloaded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import check_state_dict, load_file, save_file


@dataclass(frozen=True)
class ClassifierConfig:
    width: int = 32
    feature_dim: int = 128
    num_classes: int = 10


class MnistClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * w * 49, cfg.feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.out = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (N, 1, 28, 28) in [-1, 1] -> (N, feature_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.features(x)))


def uint8_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) -> float (N, 1, 28, 28) in [-1, 1]."""
    if images.dim() == 3:
        images = images[:, None]
    return images.float() / 127.5 - 1


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (padding with background): cheap augmentation."""
    pad = F.pad(x, [max_shift] * 4, value=-1.0)
    n, _, h, w = x.shape
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen))
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, cfg: ClassifierConfig = ClassifierConfig(), log=print) -> MnistClassifier:
    """x: float (N, 1, 28, 28) in [-1, 1]; y: long (N,). Adam with a one-cycle schedule."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MnistClassifier(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}")
    return model.eval()


@torch.inference_mode()
def predict(model: MnistClassifier, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def save_classifier(path, model: MnistClassifier, train: dict | None = None) -> None:
    save_file(path, model.state_dict(), {"kind": "classifier", "config": asdict(model.cfg), "train": train or {}})


def load_classifier(path) -> tuple[MnistClassifier, dict]:
    tensors, meta = load_file(path, kind="classifier")
    model = MnistClassifier(ClassifierConfig(**meta["config"]))
    check_state_dict(model, tensors, str(path))
    model.load_state_dict(tensors)
    return model.eval(), meta
