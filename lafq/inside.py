"""Explainability along the denoising trajectory: activations, saliency, and where quantization error grows.

All functions run one guided DDIM trajectory for a single sample and observe the top-level
layers (stem, down1..3, mid, up3..1, head) through forward hooks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .device import model_device
from .diffusion import DEFAULT_GUIDANCE, Schedule, ddim_sample, linear_schedule, q_sample
from .model import LAYERS

OBSERVED = [layer for layer in LAYERS if layer != "embed"]


def supports(den) -> bool:
    """Whether these traces apply to an adapter's model: they observe the project U-Net's named layers."""
    return den.source.get("library") == "lafq" and den.source.get("class") == "UNet"


@dataclass
class Trace:
    layers: list[str]
    timesteps: list[int]  # the denoising steps, in order (high t first)
    matrix: torch.Tensor  # (layers, steps)
    maps: dict[str, torch.Tensor] | None = None  # layer -> (steps, H, W) channel-mean |activation|
    image: torch.Tensor | None = None  # the final sample, [-1, 1], (1, 28, 28)


class _Recorder:
    """Hooks that keep each observed layer's output (first half of a guided batch: the conditional branch)."""

    def __init__(self, model, layers=OBSERVED):
        self.outputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        self.handles = [getattr(model, layer).register_forward_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer):
        def hook(_module, _inp, out):
            self.outputs[layer].append(out[: max(1, out.shape[0] // 2)].detach().float())
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _timesteps(schedule, steps):
    from .diffusion import ddim_timesteps
    return ddim_timesteps(schedule.T, steps)


def _one_trajectory(denoiser, model, label, steps, guidance, seed, schedule, recorders) -> torch.Tensor:
    """One guided DDIM sample on `model`'s device, through `denoiser`; the recorders' hooks removed after."""
    try:
        return ddim_sample(denoiser, schedule, 1, steps=steps, guidance=guidance,
                           labels=None if label is None else [label], null_class=model.cfg.num_classes,
                           generator=torch.Generator().manual_seed(seed), device=model_device(model))
    finally:
        for rec in recorders:
            rec.close()


def activation_trace(model, label: int | None, *, steps: int = 25, guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
                     schedule: Schedule | None = None) -> Trace:
    """Mean |activation| of every layer at every denoising step, plus channel-mean spatial maps."""
    schedule = schedule or linear_schedule()
    model = copy.deepcopy(model)  # hooks on a private copy: a shared model may serve other requests meanwhile
    rec = _Recorder(model)
    img = _one_trajectory(model, model, label, steps, guidance, seed, schedule, [rec])
    matrix = torch.stack([torch.stack([o.abs().mean() for o in rec.outputs[layer]]) for layer in OBSERVED])
    maps = {layer: torch.stack([o[0].abs().mean(0) for o in rec.outputs[layer]]).cpu() for layer in OBSERVED}
    return Trace(OBSERVED, _timesteps(schedule, steps), matrix.cpu(), maps, img[0].cpu())


def saliency(model, image: torch.Tensor, label: int | None, t: int, *, seed: int = 0,
             schedule: Schedule | None = None) -> dict[str, torch.Tensor]:
    """|dL/dx_t| of the denoising loss for one real image noised to timestep t.

    image: float (1, 28, 28) in [-1, 1]. Returns x_t, the model's x0 estimate and the saliency map (28, 28).
    """
    schedule = schedule or linear_schedule()
    gen = torch.Generator().manual_seed(seed)
    dev = model_device(model)
    noise = torch.randn((1, *image.shape), generator=gen).to(dev)
    tt = torch.tensor([t], device=dev)
    y = torch.tensor([model.cfg.num_classes if label is None else label], device=dev)
    xt = q_sample(schedule, image[None].to(dev), tt, noise).requires_grad_(True)
    with torch.enable_grad():
        eps = model(xt, tt, y)
        loss = torch.nn.functional.mse_loss(eps, noise)
        (g,) = torch.autograd.grad(loss, xt)
    abar = schedule.abar(tt)
    x0 = ((xt - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    out = {"x_t": xt.detach()[0, 0], "x0_hat": x0.detach()[0, 0], "saliency": g.abs()[0, 0], "loss": loss.detach()}
    return {k: v.cpu() for k, v in out.items()}


def quantization_error_trace(reference, quantized, label: int | None, *, steps: int = 25,
                             guidance: float = DEFAULT_GUIDANCE, seed: int = 0, schedule: Schedule | None = None) -> Trace:
    """Relative L2 error ||q - f|| / ||f|| of each layer's output, feeding both models the reference trajectory.

    Both models see the same x_t at every step (the FP32 model's path), so the error at each layer
    is the quantization's own, not drift of the trajectory; the last row is the predicted noise.
    """
    schedule = schedule or linear_schedule()
    reference, quantized = copy.deepcopy(reference), copy.deepcopy(quantized)  # see activation_trace
    ref_rec, q_rec = _Recorder(reference), _Recorder(quantized)

    def both(x, t, y):
        out = reference(x, t, y)
        quantized(x, t, y)  # observed through its hooks only
        return out
    img = _one_trajectory(both, reference, label, steps, guidance, seed, schedule, [ref_rec, q_rec])
    rows = []
    for layer in OBSERVED:
        rows.append(torch.stack([(q - f).norm() / f.norm().clamp_min(1e-12)
                                 for f, q in zip(ref_rec.outputs[layer], q_rec.outputs[layer])]))
    return Trace(OBSERVED, _timesteps(schedule, steps), torch.stack(rows).cpu(), None, img[0].cpu())
