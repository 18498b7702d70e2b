"""Explainability along the denoising trajectory: activations, saliency, and where quantization error grows.

Contracts:
- Every function takes any adapter (lafq.models.Denoiser, or the project U-Net) and observes the model's own
  layers (lafq.layers: the U-Net's `stem`..`head`, a diffusers U-Net's `conv_in`, `down_blocks.0`, ...,
  a DiT's `transformer_blocks.3`) through forward hooks on a private copy: a shared model may serve other
  requests meanwhile, and is never hooked. A layer that is a list of modules is observed at its last module.
- A trace keeps the layers whose outputs are sample-like (a batch of channels × space or tokens × features,
  3-D or more): embeddings are left out. Spatial maps: the channel mean of |activation| for 4-D outputs, the
  feature mean on the patch grid for tokens of a square grid (a DiT's).
- The trajectory is lafq.pipeline.denoise's (one sample, its noise rule): the same seed gives the same
  sample as Compare. With guidance, hooks keep the conditional half of the batch (lafq.diffusion.guided_eps
  puts it first).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from .diffusion import DEFAULT_GUIDANCE, ddim_timesteps


@dataclass
class Trace:
    layers: list[str]
    timesteps: list[int]  # the denoising steps, in order (high t first)
    matrix: torch.Tensor  # (layers, steps)
    maps: dict[str, torch.Tensor] | None = None  # layer -> (steps, H, W) mean |activation| (see _spatial)
    image: torch.Tensor | None = None  # the final sample, [-1, 1], (C, H, W)


def _den(model):
    from .pipeline import as_denoiser
    return as_denoiser(model)


def _observable(module: torch.nn.Module, layer: str) -> torch.nn.Module | None:
    try:
        m = module.get_submodule(layer)
    except AttributeError:
        return None
    while isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and len(m):
        m = m[-1]  # a list is observed at its last module (its output leaves the list)
    return None if isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict)) else m


def _first_tensor(out):
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if hasattr(out, "sample") and torch.is_tensor(out.sample):  # diffusers' output dataclasses
        out = out.sample
    return out if torch.is_tensor(out) else None


class _Recorder:
    """Hooks that keep each observed layer's output (the first half of a guided batch: the conditional branch)."""

    def __init__(self, module, layers, halve: bool):
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for layer in layers:
            m = _observable(module, layer)
            if m is not None:
                self.outputs[layer] = []
                self.handles.append(m.register_forward_hook(self._hook(layer, halve)))

    def _hook(self, layer, halve):
        def hook(_module, _inp, out):
            t = _first_tensor(out)
            if t is not None and t.dim() >= 3:
                self.outputs[layer].append(t[: max(1, t.shape[0] // 2) if halve else 1].detach().float())
        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def kept(self, steps: int) -> list[str]:
        """The layers that gave a sample-like output at every step, in layer order."""
        return [layer for layer, outs in self.outputs.items() if len(outs) == steps]


def _spatial(a: torch.Tensor) -> torch.Tensor | None:
    """One sample's output as a map: channels x H x W -> the channel mean of |a|; tokens x features with a square
    number of tokens (a DiT's patches, row by row) -> the feature mean of |a| on the patch grid; else None."""
    if a.dim() == 3:
        return a.abs().mean(0)
    side = int(round(a.shape[0] ** 0.5)) if a.dim() == 2 else 0
    return a.abs().mean(-1).view(side, side) if side and side * side == a.shape[0] else None


def layer_names(model) -> list[str]:
    """The adapter's layers in flow order (lafq.layers), the candidates a trace observes."""
    from .layers import layers_of
    from .policy import param_shapes

    return list(layers_of(param_shapes(_den(model).module)).order)


def _trajectory(den, label, steps, guidance, seed):
    """One sample along lafq.pipeline.denoise's trajectory (its noise rule), on the model's device."""
    from .pipeline import SampleSpec, denoise

    spec = SampleSpec(n=1, labels=() if label is None else (label,), steps=steps, guidance=guidance, seed=seed,
                      batch_size=1)
    return denoise(den, spec)[0]


def _guided(den, label, guidance) -> bool:
    return label is not None and guidance != 1.0 and den.null_row is not None


def _timesteps(den, steps):
    """The model's timestep at each sampling step: DDIM's grid, or sigma * T of a flow-matching model's Euler steps."""
    if den.schedule.flow:
        from .diffusion import flow_sampling_sigmas
        return [round(float(s) * den.T) for s in flow_sampling_sigmas(den.schedule, steps)[:-1]]
    return ddim_timesteps(den.T, steps)


def activation_drift(model, *, n: int = 8, steps: int = 25, bins: int = 10, guidance: float = DEFAULT_GUIDANCE,
                     seed: int = 0):
    """How far the input range of every weight layer (each Conv2d and Linear) drifts over the denoising steps:
    lafq.int8.calibrate_activations on a private copy of the model (n samples of the model's classes in turn,
    lafq.pipeline.denoise's noise rule), per timestep bin. Returns its lafq.int8.ActivationRanges; `.drift()` is
    each layer's widest bin over its narrowest: what one static W8A8 scale per layer would have to span (why
    the w8a8 mode calibrates per bin, as Q-Diffusion does)."""
    from .int8 import calibrate_activations

    den = _den(model)
    den = replace(den, module=copy.deepcopy(den.module))
    layers = [k for k, m in den.module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return calibrate_activations(den, n=n, steps=steps, guidance=guidance, bins=bins, seed=seed, layers=layers)


def activation_trace(model, label: int | None, *, steps: int = 25, guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
                     schedule=None) -> Trace:
    """Mean |activation| of every observed layer at every denoising step, plus channel-mean spatial maps."""
    den = _den(model)
    den = replace(den, module=copy.deepcopy(den.module), **({"schedule": schedule} if schedule is not None else {}))
    rec = _Recorder(den.module, layer_names(den), _guided(den, label, guidance))
    try:
        img = _trajectory(den, label, steps, guidance, seed)
    finally:
        rec.close()
    n = len(_timesteps(den, steps))
    layers = rec.kept(n)
    matrix = torch.stack([torch.stack([o.abs().mean() for o in rec.outputs[layer]]) for layer in layers])
    maps = {layer: torch.stack([_spatial(o[0]) for o in rec.outputs[layer]]).cpu()
            for layer in layers if _spatial(rec.outputs[layer][0][0]) is not None}
    return Trace(layers, _timesteps(den, steps), matrix.cpu(), maps, img[0].cpu())


def saliency(model, image: torch.Tensor, label: int | None, t: int, *, seed: int = 0, schedule=None) -> dict:
    """|dL/dx_t| of the denoising loss for one real image noised to timestep t.

    image: float (C, H, W) in [-1, 1]. Returns x_t, the model's x0 estimate and the saliency map (H, W),
    each summed or averaged over the channels (one channel: that channel).
    """
    from .fisher import classes_of

    den = _den(model)
    if schedule is not None:
        den = replace(den, schedule=schedule)
    dev = next(den.module.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *image.shape), generator=gen).to(dev)
    tt = torch.tensor([t], device=dev)
    x0 = image[None].to(dev)
    if label is None:
        rows = None if den.null_row is None else torch.tensor([den.null_row])
    else:
        rows = torch.tensor([classes_of(den)[label]])
    xt = den.noisy(x0, noise, tt).requires_grad_(True)
    with torch.enable_grad():
        pred = den.predict(xt, tt, rows)
        loss = torch.nn.functional.mse_loss(pred, den.target(x0, noise, tt))
        (g,) = torch.autograd.grad(loss, xt)
    with torch.no_grad():
        x0_hat = den.x0_estimate(xt.detach(), tt, rows).clamp(-1, 1)
    out = {"x_t": xt.detach()[0].mean(0), "x0_hat": x0_hat[0].mean(0), "saliency": g.abs()[0].sum(0),
           "loss": loss.detach()}
    return {k: v.cpu() for k, v in out.items()}


class _Both(torch.nn.Module):
    """Runs the reference module and, on the same inputs, the quantized one (observed through its hooks only).
    The quantized module is held outside the module tree, so the sampler computes in the reference's dtype."""

    def __init__(self, reference, quantized, dtype):
        super().__init__()
        self.reference = reference
        self._quantized, self._dtype = [quantized], dtype

    def forward(self, *args, **kwargs):
        out = self.reference(*args, **kwargs)
        cast = (lambda v: v.to(self._dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
        with torch.no_grad():
            self._quantized[0](*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        return out


def quantization_error_trace(reference, quantized, label: int | None, *, steps: int = 25,
                             guidance: float = DEFAULT_GUIDANCE, seed: int = 0, schedule=None) -> Trace:
    """Relative L2 error ||q - f|| / ||f|| of each observed layer's output, both models fed the reference's
    trajectory: both see the same x_t at every step (the FP32 model's path), so the error at each layer is the
    quantization's own, not drift of the trajectory."""
    from .quantize import hold_dequantized

    ref, q = _den(reference), _den(quantized)
    if schedule is not None:
        ref = replace(ref, schedule=schedule)
    r_mod, q_mod = copy.deepcopy(ref.module), copy.deepcopy(q.module)
    halve = _guided(ref, label, guidance)
    layers = layer_names(ref)
    ref_rec, q_rec = _Recorder(r_mod, layers, halve), _Recorder(q_mod, layers, halve)
    try:
        with hold_dequantized(q_mod):
            img = _trajectory(replace(ref, module=_Both(r_mod, q_mod, q.compute_dtype())), label, steps, guidance, seed)
    finally:
        ref_rec.close()
        q_rec.close()
    n = len(_timesteps(ref, steps))
    kept = [layer for layer in ref_rec.kept(n) if layer in q_rec.kept(n)]
    rows = [torch.stack([(qo - f).norm() / f.norm().clamp_min(1e-12)
                         for f, qo in zip(ref_rec.outputs[layer], q_rec.outputs[layer])]) for layer in kept]
    return Trace(kept, _timesteps(ref, steps), torch.stack(rows).cpu(), None, img[0].cpu())
