"""Adapter for the project's own class-conditional U-Net (lafq.model.UNet).

Conditioning rows are the class ids 0..num_classes, the last being the learned null class, so a
row index is the label itself. `lafq.fisher.compute_fisher` runs the shipped map's recipe (class-balanced
draws, null-label dropout) through this adapter.
"""
from __future__ import annotations

import torch

from ..diffusion import Schedule, linear_schedule
from .base import Conditioning, Denoiser


def _call(fn, x, t, kwargs):
    return fn(x, t, kwargs.get("y"))


def from_lafq_unet(model, schedule: Schedule | None = None) -> Denoiser:
    """Wrap a lafq U-Net (FP32 or quantized): epsilon prediction on the DDPM linear schedule."""
    cfg = model.cfg
    cond = Conditioning({"y": torch.arange(cfg.num_classes + 1)}, cfg.num_classes + 1) if cfg.num_classes else None
    return Denoiser(module=model, call=_call, schedule=schedule or linear_schedule(), prediction_type="epsilon",
                    sample_shape=(cfg.image_channels, cfg.image_size, cfg.image_size), conditioning=cond,
                    source={"library": "lafq", "class": "UNet", "config": cfg.to_dict()},
                    null_row=cfg.num_classes if cfg.num_classes else None)
