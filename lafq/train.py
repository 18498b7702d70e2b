"""Training: the diffusion U-Net (AdamW, EMA, classifier-free label dropout, resume).

Files a run writes into its output directory `out/`:
    unet.safetensors          EMA weights: what sampling, Fisher and the app load
    train_state.safetensors   raw weights, EMA, AdamW moments and RNG states: resume is exact
    train_log.jsonl           one JSON line per log interval
    samples.png               the latest grid of EMA samples (one row per class)
"""
from __future__ import annotations

import copy
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from .card import CARD_FILE, model_card
from .checkpoint import CheckpointError, atomic_write_bytes, config_mismatch, load_file, save_file, save_unet
from .data import OFFLINE_TRAIN, load_dataset
from .diffusion import linear_schedule, q_sample, sample
from .model import UNet, UNetConfig, count_parameters


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = OFFLINE_TRAIN
    steps: int = 30000  # total; the learning-rate schedule spans these
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    warmup: int = 500
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # label dropout that trains the null class for guidance
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 disables
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    save_every: int = 1000
    sample_every: int = 2000

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def diffusion_loss(model, schedule, x0, y, t, noise, min_snr_gamma: float = 0.0, reduce: bool = True, call=None):
    """Epsilon-prediction MSE; per-sample losses if reduce=False. Min-SNR weighting when gamma > 0.
    `call(model, x_t, t, y)` runs a model whose forward is not (x_t, t, y) (a diffusers U-Net's class_labels)."""
    xt = q_sample(schedule, x0, t, noise)
    pred = call(model, xt, t, y) if call is not None else model(xt, t, y)
    per_sample = F.mse_loss(pred, noise, reduction="none").flatten(1).mean(1)
    if min_snr_gamma > 0:
        abar = schedule.abar(t)
        snr = abar / (1 - abar)
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    return per_sample.mean() if reduce else per_sample


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up so early checkpoints are usable: the EMA horizon grows with the step count."""
    return min(decay, (1 + step) / (10 + step))


def save_grid(images: torch.Tensor, path, nrow: int) -> None:
    """Save images in [-1, 1] as a PNG grid, atomically."""
    import io

    from torchvision.utils import save_image

    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    save_image((images + 1) / 2, buf, nrow=nrow, padding=2, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _train_state_tensors(model, ema, opt, gen) -> dict:
    names = [n for n, _ in model.named_parameters()]
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, name in enumerate(names):
        s = opt.state.get(opt.param_groups[0]["params"][i], {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s:
                state[f"optim.{name}.{key}"] = s[key]
    state["rng.torch"] = torch.get_rng_state()
    state["rng.gen"] = gen.get_state()
    if next(model.parameters()).is_cuda:  # dropout draws from the GPU's generator there
        state["rng.cuda"] = torch.cuda.get_rng_state()
    return {k: v.detach().cpu() for k, v in state.items()}


def _restore_train_state(tensors, model, ema, opt, gen, step: int) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    for i, (name, p) in enumerate(model.named_parameters()):
        if f"optim.{name}.exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(float(step)),
                            "exp_avg": tensors[f"optim.{name}.exp_avg"].to(p.device, copy=True),
                            "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"].to(p.device, copy=True)}
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.gen"])
    if "rng.cuda" in tensors and next(model.parameters()).is_cuda:
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def check_same_run(state_path: Path, meta: dict, cfg: TrainConfig) -> None:
    """A train state resumes only the run it came from: same dataset, same seed."""
    old = TrainConfig.from_dict(meta["train_config"])
    if old.dataset != cfg.dataset or old.seed != cfg.seed:
        raise CheckpointError(f"{state_path} was trained on {old.dataset!r} seed {old.seed}; asked for "
                              f"{cfg.dataset!r} seed {cfg.seed}: use a new output directory")


def run_steps(out: Path, model, ema, opt, gen, data: tuple[torch.Tensor, torch.Tensor], schedule, cfg: TrainConfig, *,
              null_class: int, step: int, stop: int, wall: float, checkpoint, sample_grid, channels_last: bool,
              device, progress: bool, call=None) -> dict:
    """The training loop shared by every architecture trained here: `model(x_t, t, y)` (or `call(model, x_t, t,
    y)`) predicts the noise.

    Steps `step` -> `stop`: batches, label dropout to `null_class`, timesteps and noise drawn from `gen` on
    the CPU; AdamW at lr_at(step), gradient clipping, EMA update. Appends to out/train_log.jsonl every
    cfg.log_every steps, calls sample_grid() every cfg.sample_every steps and checkpoint(step, wall)
    every cfg.save_every steps and at `stop`. Returns the last log record.
    """
    x_all, y_all = data
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    model.train()
    losses: list[float] = []
    record: dict = {"step": step}
    t_last = time.perf_counter()
    while step < stop:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(cfg.batch_size, generator=gen) < cfg.p_uncond] = null_class
        t = torch.randint(0, schedule.T, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, y, t, noise = (v.to(device) for v in (x0, y, t, noise))
        if channels_last:
            x0, noise = x0.to(memory_format=torch.channels_last), noise.to(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = diffusion_loss(model, schedule, x0, y, t, noise, cfg.min_snr_gamma, call=call)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, model, ema_decay_at(step, cfg.ema_decay))
        step += 1
        losses.append(loss.item())
        if bar:
            bar.update(1)
        if step % cfg.log_every == 0 or step == stop:
            now = time.perf_counter()
            wall += now - t_last
            t_last = now
            record = {"step": step, "loss": sum(losses) / len(losses), "lr": lr_at(step - 1, cfg),
                      "wall_seconds": round(wall, 1)}
            losses = []
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if bar:
                bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % cfg.sample_every == 0 or step == cfg.steps:
            sample_grid()
        if step % cfg.save_every == 0 or step == stop:
            checkpoint(step, wall + time.perf_counter() - t_last)
    if bar:
        bar.close()
    return record


def trim_log(path: Path, step: int) -> None:
    """Keep the log's lines up to `step` (where a run resumes; 0 for a fresh one): a run killed after logging
    and before its next checkpoint logged steps it will do again, and their lines would be doubled. A line cut
    short by the kill is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(k + "\n" for k in kept).encode())


def train(out: str | Path, cfg: TrainConfig = TrainConfig(), model_cfg: UNetConfig = UNetConfig(),
          resume: bool = True, progress: bool = True, channels_last: bool = True, data_root=None,
          until: int | None = None, device="cpu") -> dict:
    """Train (or resume from out/train_state.safetensors) up to cfg.steps; returns the last log record.

    `until` stops this call early at that step (a checkpoint is written there); the learning-rate
    schedule still spans cfg.steps, so a run split over several calls equals one uninterrupted run.
    Batches, timesteps and noise are drawn on the CPU whatever `device` is, so a run can move between
    a CPU and a GPU and go on with the same data (a resumed run on another device is not bit-identical).
    """
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.safetensors"
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = UNet(model_cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, wall = 0, 0.0
    if resume and state_path.exists():
        tensors, meta = load_file(state_path, kind="train_state")
        diff = config_mismatch(model_cfg.to_dict(), UNetConfig.from_dict(meta["config"]).to_dict())
        if diff:
            raise CheckpointError(f"{state_path}: model config differs from the one asked for: " + "; ".join(diff))
        check_same_run(state_path, meta, cfg)
        step, wall = meta["step"], meta["wall_seconds"]
        _restore_train_state(tensors, model, ema, opt, gen, step)
    trim_log(out / "train_log.jsonl", step)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    data = load_dataset(cfg.dataset, data_root)
    x_all, y_all = data.tensors()
    schedule = linear_schedule()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} {torch.get_num_threads()} threads"
    info = {"dataset": cfg.dataset, "dataset_size": len(data), "params": count_parameters(model),
            "torch": torch.__version__, "machine": machine,
            "seed": cfg.seed}

    def checkpoint(step_now: int, wall_now: float) -> None:
        facts = {**info, "steps": step_now, "wall_seconds": round(wall_now, 1),
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "train_config": asdict(cfg)}
        save_unet(out / "unet.safetensors", ema, train=facts)
        card = out / CARD_FILE
        if not card.exists():  # the model card the CLI and the app read beside the model; never overwritten
            atomic_write_bytes(card, (json.dumps(model_card(cfg.dataset, model_cfg.num_classes or None,
                                                            kind="U-Net (lafq)"),
                                                 indent=2) + "\n").encode())
        save_file(state_path, _train_state_tensors(model, ema, opt, gen),
                  {"kind": "train_state", "config": model_cfg.to_dict(), "train_config": asdict(cfg),
                   "step": step_now, "wall_seconds": wall_now})

    def sample_grid() -> None:
        labels = torch.arange(10).repeat_interleave(8) if model_cfg.num_classes else None
        imgs = sample(ema, schedule, 80, steps=25, seed=0, labels=labels, null_class=model_cfg.num_classes,
                      device=device).cpu()
        save_grid(imgs, out / "samples.png", nrow=8)

    stop = min(cfg.steps, until) if until else cfg.steps
    return run_steps(out, model, ema, opt, gen, (x_all, y_all), schedule, cfg, null_class=model_cfg.num_classes,
                     step=step, stop=stop, wall=wall, checkpoint=checkpoint, sample_grid=sample_grid,
                     channels_last=channels_last, device=device, progress=progress)
