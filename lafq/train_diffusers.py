"""Training a class-conditional diffusers `UNet2DModel` or `DiTTransformer2DModel` (adaLN-Zero, class labels) with a
diffusers `DDPMScheduler` (epsilon target).

The recipe and the step loop are lafq.train's (`run_steps`: AdamW, warm-up + cosine, EMA with warm-up,
label dropout to the null class, Min-SNR weighting, gradient clipping); only the model and the files
differ. The model takes `num_class_embeds = classes + 1` labels: the last one is the null class that
classifier-free guidance uses.

Files a run writes into its output directory `out/` (a pipeline-style folder `lafq.models.load_diffusers`
loads):
    model_index.json                          names the components (DDPMPipeline layout: unet or transformer +
                                              scheduler)
    unet/ (or transformer/ for a DiT): config.json, diffusion_pytorch_model.safetensors   EMA weights
    scheduler/scheduler_config.json           DDPMScheduler: linear betas 1e-4..0.02, T=1000, epsilon
    lafq.json                                 name, dataset, reference, classes, null_class, guidance, train facts
    train_state.safetensors                   raw weights, EMA, AdamW moments, RNG states: resume is exact
    train_log.jsonl                           one JSON line per log interval
    samples.png                               EMA samples, one row per class (DDIM-25, guidance 1.5)
Every file is replaced atomically. `until` stops a call early; the schedule spans cfg.steps, so a run
split over several calls equals one uninterrupted run (same weights).
"""
from __future__ import annotations

import copy
import json
import platform
import tempfile
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from .card import model_card
from .checkpoint import CheckpointError, atomic_write_bytes, config_mismatch, load_file, save_file
from .data import load_dataset
from .diffusion import sample
from .train import (TrainConfig, _restore_train_state, _train_state_tensors, check_same_run, run_steps, trim_log,
                    save_grid)

@dataclass(frozen=True)
class UNet2DConfig:
    """The UNet2DModel's shape (1 channel in and out); `num_class_embeds` counts the null class."""
    sample_size: int = 28
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 8
    num_class_embeds: int = 11

    def __post_init__(self):
        if self.num_class_embeds < 2:
            raise ValueError(f"num_class_embeds counts the classes and the null class: at least 2, got {self.num_class_embeds}")
        if not len(self.block_out_channels) == len(self.down_block_types) == len(self.up_block_types):
            raise ValueError("block_out_channels, down_block_types and up_block_types must have the same length")

    @property
    def null_class(self) -> int:
        return self.num_class_embeds - 1

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNet2DConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    def build(self) -> nn.Module:
        from diffusers import UNet2DModel
        return UNet2DModel(in_channels=1, out_channels=1, **asdict(self))


@dataclass(frozen=True)
class DiTConfig:
    """A class-conditional DiT (`DiTTransformer2DModel`, adaLN-Zero; 1 channel in and out, no learned variance).
    Its label embedding holds `num_classes` classes and, after them, the null class guidance uses (diffusers' own
    classifier-free embedding row): the null class is `num_classes`."""
    sample_size: int = 28
    patch_size: int = 2
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    num_classes: int = 10

    def __post_init__(self):
        if self.sample_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide sample_size {self.sample_size}")
        if self.num_classes < 1 or self.num_layers < 1:
            raise ValueError("a DiT needs at least one class and one layer")

    @property
    def null_class(self) -> int:
        return self.num_classes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def build(self) -> nn.Module:
        from diffusers import DiTTransformer2DModel
        return DiTTransformer2DModel(in_channels=1, out_channels=1, sample_size=self.sample_size,
                                     patch_size=self.patch_size, num_layers=self.num_layers,
                                     num_attention_heads=self.num_attention_heads,
                                     attention_head_dim=self.attention_head_dim, num_embeds_ada_norm=self.num_classes,
                                     norm_num_groups=1)


ARCHITECTURES = {"unet": ("UNet2DModel", "unet", UNet2DConfig), "dit": ("DiTTransformer2DModel", "transformer", DiTConfig)}


def _arch(model_cfg) -> tuple[str, str, type]:
    """(diffusers class, pipeline component folder, config class) of a model config."""
    return next(v for v in ARCHITECTURES.values() if isinstance(model_cfg, v[2]))


def make_scheduler():
    """The DDPM schedule the project's U-Net uses: linear betas 1e-4..0.02 over T=1000, epsilon target."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         prediction_type="epsilon")


def class_call(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loop's call (lafq.train.run_steps): a class-conditional UNet2DModel's or DiT's predicted noise."""
    return unet(x, timestep=t, class_labels=y, return_dict=False)[0]


def _unwrapped(tensors: dict) -> dict:
    """Train states written while the U-Net was wrapped (its keys under `unet.`) read as the U-Net's own."""
    out = {}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        out[f"{head}.{rest[5:]}" if head in ("model", "ema", "optim") and rest.startswith("unet.") else k] = v
    return out


def _save_pretrained(obj, folder: Path, **kw) -> None:
    """`obj.save_pretrained` into `folder`, each file replaced atomically (written beside it first)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        obj.save_pretrained(tmp, **kw)
        for f in sorted(Path(tmp).iterdir()):
            atomic_write_bytes(folder / f.name, f.read_bytes())


def save_pipeline(out: Path, unet: nn.Module, scheduler, card: dict, component: str = "unet") -> None:
    """unet/ (or transformer/) + scheduler/ + model_index.json + lafq.json: the folder load_diffusers(out) reads."""
    import diffusers

    _save_pretrained(unet, out / component, safe_serialization=True)
    _save_pretrained(scheduler, out / "scheduler")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
             component: ["diffusers", type(unet).__name__], "scheduler": ["diffusers", type(scheduler).__name__]}
    atomic_write_bytes(out / "model_index.json", (json.dumps(index, indent=2) + "\n").encode())
    atomic_write_bytes(out / "lafq.json", (json.dumps(card, indent=2) + "\n").encode())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_diffusers(out: str | Path, cfg: TrainConfig, model_cfg: UNet2DConfig | DiTConfig = UNet2DConfig(), *,
                    resume: bool = True, progress: bool = True, until: int | None = None, data_root=None,
                    device="cpu") -> dict:
    """Train (or resume from out/train_state.safetensors) up to cfg.steps; returns the last log record."""
    from .models.diffusers_models import schedule_of

    device = torch.device(device)
    arch, component, cfg_cls = _arch(model_cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.safetensors"
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = model_cfg.build().to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, wall = 0, 0.0
    if resume and state_path.exists():
        tensors, meta = load_file(state_path, kind="train_state")
        if meta.get("architecture") != arch:
            raise CheckpointError(f"{state_path} is not a {arch} train state: use a new output directory")
        diff = config_mismatch(model_cfg.to_dict(), cfg_cls.from_dict(meta["config"]).to_dict())
        if diff:
            raise CheckpointError(f"{state_path}: model config differs from the one asked for: " + "; ".join(diff))
        check_same_run(state_path, meta, cfg)
        step, wall = meta["step"], meta["wall_seconds"]
        _restore_train_state(_unwrapped(tensors), model, ema, opt, gen, step)
    trim_log(out / "train_log.jsonl", step)

    data = load_dataset(cfg.dataset, data_root)
    x_all, y_all = data.tensors()
    if int(y_all.max()) >= model_cfg.null_class:
        raise ValueError(f"{cfg.dataset} has labels up to {int(y_all.max())}; the model has {model_cfg.null_class} "
                         "classes (the null class comes after them)")
    scheduler = make_scheduler()
    schedule = schedule_of(scheduler)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} {torch.get_num_threads()} threads"
    info = {"dataset": cfg.dataset, "dataset_size": len(data), "params": count_parameters(model),
            "torch": torch.__version__, "machine": machine, "seed": cfg.seed}

    def checkpoint(step_now: int, wall_now: float) -> None:
        facts = {**info, "steps": step_now, "wall_seconds": round(wall_now, 1),
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "train_config": asdict(cfg)}
        save_pipeline(out, ema, scheduler, model_card(cfg.dataset, model_cfg.null_class, facts,
                                                      kind=f"{arch} (diffusers)"), component)
        save_file(state_path, _train_state_tensors(model, ema, opt, gen),
                  {"kind": "train_state", "architecture": arch, "config": model_cfg.to_dict(),
                   "train_config": asdict(cfg), "step": step_now, "wall_seconds": wall_now})

    def sample_grid() -> None:
        labels = torch.arange(model_cfg.null_class).repeat_interleave(8)
        imgs = sample(lambda x, t, y: class_call(ema, x, t, y), schedule, len(labels), steps=25, seed=0,
                      labels=labels, null_class=model_cfg.null_class, device=device).cpu()
        save_grid(imgs, out / "samples.png", nrow=8)

    stop = min(cfg.steps, until) if until else cfg.steps
    return run_steps(out, model, ema, opt, gen, (x_all, y_all), schedule, cfg, null_class=model_cfg.null_class,
                     step=step, stop=stop, wall=wall, checkpoint=checkpoint, sample_grid=sample_grid,
                     channels_last=False, device=device, progress=progress, call=class_call)
