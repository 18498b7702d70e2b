"""Per-sample squared gradients from one batched backward pass, by layer hooks.

For a layer y = W x, the gradient of sample s alone is an outer product of that sample's output
gradient and its input (summed over pixels for a convolution), so one ordinary forward/backward
over the batch, with each layer's input and output gradient kept, gives every sample's gradient
exactly (the idea behind BackPACK and Opacus). On this project's 2-core CPU it is about 2x faster than
a per-sample loop and on par with `torch.func.vmap` (docs/benchmark-runs.md), without depending on
functorch batching rules (vmap falls back to a slow path for CPU attention).

Supported parameter owners: Linear, Conv2d (groups=1), GroupNorm, LayerNorm, Embedding; any other
parameter raises, so a new layer type can never be silently left out of a Fisher map. `owners=`
restricts the pass to chosen modules.

`sq_grads(den, x0, noise, t, rows)` is what Fisher maps call for any `lafq.models.Denoiser`; it picks
an exact method per parameter:
    hooks   this one batched backward, for every module the hooks can split and that runs once per forward
    vmap    `torch.func.vmap(grad)` over the remaining parameters (other layer types, reused modules)
    naive   one backward per sample: where vmap fails on an operation, and the reference
`method="hooks"` falls back parameter by parameter (vmap, else naive); "vmap" and "naive" apply to all.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

if TYPE_CHECKING:
    from .models.base import Denoiser

METHODS = ("hooks", "vmap", "naive")  # all exact; hooks is the fastest on CPU (docs/benchmark-runs.md)
SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


def hookable(mod: nn.Module) -> bool:
    """Whether this pass can split `mod`'s own parameters' gradients per sample."""
    if isinstance(mod, nn.Conv2d):
        return mod.groups == 1 and not isinstance(mod.padding, str) and mod.padding_mode == "zeros"
    return isinstance(mod, SUPPORTED)


def _check_supported(model: nn.Module) -> list[tuple[str, nn.Module]]:
    owners = []
    for name, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False))
        if not own:
            continue
        if not hookable(mod):
            raise TypeError(f"per-sample hooks do not support {type(mod).__name__} ({name}); use method='vmap'")
        owners.append((name, mod))
    return owners


def _conv_weight_grads(mod: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(S, Cout, Cin, kh, kw): one batched matmul per kernel offset over shifted views of the input,
    in pixels-by-channels order (free views of channels-last tensors). About 3x faster on a CPU than
    F.unfold (im2col) followed by one large matmul."""
    if isinstance(mod.padding, str):
        raise TypeError(f"per-sample hooks need numeric conv padding, got {mod.padding!r}; use method='vmap'")
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = mod.kernel_size, mod.stride, mod.dilation, mod.padding
    S, C = x.shape[:2]
    cout, hout, wout = g.shape[1:]
    xh = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # (S, H+2ph, W+2pw, C)
    gt = g.permute(0, 2, 3, 1).reshape(S, hout * wout, cout).transpose(1, 2)  # (S, Cout, P)
    out = torch.empty(S, cout, kh, kw, C, dtype=g.dtype, device=g.device)
    for i in range(kh):
        for j in range(kw):
            view = xh[:, i * dh: i * dh + (hout - 1) * sh + 1: sh, j * dw: j * dw + (wout - 1) * sw + 1: sw, :]
            out[:, :, i, j] = torch.bmm(gt, view.reshape(S, hout * wout, C))
    return out.permute(0, 1, 4, 2, 3)


def _weight_grads(mod: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients (S, *param.shape) of one module from its input x and output gradient g."""
    if isinstance(mod, nn.Linear):
        x2, g2 = x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
        out = {"weight": torch.bmm(g2.transpose(1, 2), x2)}
        if mod.bias is not None:
            out["bias"] = g2.sum(1)
        return out
    if isinstance(mod, nn.Conv2d):
        out = {"weight": _conv_weight_grads(mod, x, g)}
        if mod.bias is not None:
            out["bias"] = g.sum((2, 3))
        return out
    if isinstance(mod, nn.GroupNorm):
        xhat = F.group_norm(x, mod.num_groups, eps=mod.eps)
        out = {}
        if mod.weight is not None:
            out["weight"] = (g * xhat).flatten(2).sum(2)
            out["bias"] = g.flatten(2).sum(2)
        return out
    if isinstance(mod, nn.LayerNorm):
        xhat = F.layer_norm(x, mod.normalized_shape, eps=mod.eps)
        keep = tuple(range(1, x.dim() - len(mod.normalized_shape)))  # per sample: sum over tokens
        out = {}
        if mod.weight is not None:
            out["weight"] = (g * xhat).sum(keep) if keep else g * xhat
        if mod.bias is not None:
            out["bias"] = g.sum(keep) if keep else g
        return out
    raise AssertionError(type(mod))  # Embedding is handled without materialising rows


def _stand_ins(mod: nn.Module) -> list[torch.Tensor]:
    if isinstance(mod, nn.Conv2d):
        return [mod.bias if mod.bias is not None else mod.weight]
    return list(mod.parameters(recurse=False))


def hook_sq_grads(model: nn.Module, loss_per_sample, owners: list[tuple[str, nn.Module]] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Sum over samples of squared per-sample gradients, {name: tensor shaped like the parameter}.

    `loss_per_sample()` runs the model's forward and returns the (S,) per-sample losses; the
    model must use each parameterised module once per forward and treat samples independently
    (eval mode: no batch statistics, no dropout). `owners`: (name, module) pairs to cover
    instead of every parameterised module (each must be `hookable`).
    """
    owners = _check_supported(model) if owners is None else owners
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):
        def forward_hook(mod, args, output):
            if name in inputs:
                raise RuntimeError(f"{name} ran twice in one forward; per-sample hooks need single use")
            inputs[name] = args[0].detach()
            output.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return forward_hook

    for name, mod in owners:
        handles.append(mod.register_forward_hook(keep(name)))
    wanted = [p for _, mod in owners for p in _stand_ins(mod)]
    wanted_ids = {id(p) for p in wanted}
    # Freezing what is not asked for stops autograd computing batch weight gradients that the
    # per-sample products replace: about a third of a convolution's backward.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in wanted_ids)
    try:
        with torch.enable_grad():
            losses = loss_per_sample()
            # Asking for these gradients makes autograd reach (and hook) every layer output;
            # a conv's bias stands in for its weight.
            torch.autograd.grad(losses.sum(), wanted, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)

    acc: dict[str, torch.Tensor] = {}
    for name, mod in owners:
        prefix = f"{name}." if name else ""
        x, g = inputs.get(name), grads.get(name)
        if g is None:  # never ran, or its output does not reach the loss: every gradient is 0
            for pname, p in mod.named_parameters(recurse=False):
                acc[prefix + pname] = torch.zeros_like(p)
            continue
        if isinstance(mod, nn.Embedding):
            if x.dim() != 1:  # several lookups per sample would need a per-sample sum before squaring
                raise ValueError(f"{name}: per-sample hooks need one embedding index per sample, got shape {tuple(x.shape)}")
            g2 = g.reshape(-1, g.shape[-1]).pow(2)
            acc[prefix + "weight"] = torch.zeros_like(mod.weight).index_add_(0, x.reshape(-1), g2)
            continue
        for pname, per_sample in _weight_grads(mod, x, g).items():
            acc[prefix + pname] = per_sample.pow(2).sum(0)
    return acc


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _call_counts(den: Denoiser, x0, noise, t, rows) -> dict[str, int]:
    """How often each parameterised module runs in one forward of one sample (an embedding looked up
    more than once per sample, e.g. a token sequence, counts as its number of lookups)."""
    counts, handles = {}, []

    def count(mod, args, _out, name):
        n = args[0].numel() if isinstance(mod, torch.nn.Embedding) and args and torch.is_tensor(args[0]) else 1
        counts[name] += n

    for name, mod in den.module.named_modules():
        if list(mod.parameters(recurse=False)):
            counts[name] = 0
            handles.append(mod.register_forward_hook(lambda m, a, o, name=name: count(m, a, o, name)))
    try:
        with torch.no_grad():
            den.losses(x0[:1], noise[:1], t[:1], None if rows is None else rows[:1])
    finally:
        for h in handles:
            h.remove()
    return counts


def plan_methods(den: Denoiser, x0, noise, t, rows, method: str = "hooks") -> dict[str, str]:
    """Each parameter's per-sample gradient method: `method` where it applies, else the next exact one."""
    if method not in METHODS:
        raise ValueError(f"unknown per-sample gradient method {method!r}; choose one of {METHODS}")
    names = [n for n, _ in den.module.named_parameters()]
    if method != "hooks":
        return dict.fromkeys(names, method)
    counts = _call_counts(den, x0, noise, t, rows)
    out = {}
    for mod_name, mod in den.module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, _ in mod.named_parameters(recurse=False):
            ok = hookable(mod) and counts.get(mod_name, 0) == 1
            out[prefix + pname] = "hooks" if ok else "vmap"
    return {n: out[n] for n in names}


def _naive(den: Denoiser, names: list[str], x0, noise, t, rows) -> dict[str, torch.Tensor]:
    params = dict(den.module.named_parameters())
    acc = {n: torch.zeros_like(params[n]) for n in names}
    wanted = [params[n] for n in names]
    for i in range(len(x0)):
        r = None if rows is None else rows[i:i + 1]
        with torch.enable_grad():
            loss = den.losses(x0[i:i + 1], noise[i:i + 1], t[i:i + 1], r).sum()
            gs = torch.autograd.grad(loss, wanted, allow_unused=True)
        for n, g in zip(names, gs):
            if g is not None:
                acc[n] += g.pow(2)
    return acc


def _one_sample_loss(den: Denoiser, module, leaves, per_row, spec):
    """loss(params, x0, noise, t, per-row conditioning leaves) of one sample, for vmap(grad(...))."""
    def loss(p, x, n, tt, batched_leaves):
        it = iter(batched_leaves)
        kwargs = tree_unflatten([next(it)[None] if b else v for v, b in zip(leaves, per_row)], spec)

        def fn(*a, **k):
            return functional_call(module, p, a, k)

        t1 = tt[None]  # the model is called with its own timesteps (sigma * T for flow matching), as den.predict does
        pred = den.call(fn, den.noisy(x[None], n[None], t1), den.schedule.model_timesteps(t1), kwargs)
        return (pred - den.target(x[None], n[None], tt[None])).pow(2).mean()
    return loss


def _vmap(den: Denoiser, names: list[str], x0, noise, t, rows, chunk: int) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in den.module.named_parameters() if n in set(names)}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    module = den.module

    for i in range(0, len(x0), chunk):
        sl = slice(i, i + chunk)
        kw = den.kwargs_for(None if rows is None else rows[sl], x0[sl])
        leaves, spec = tree_flatten(kw)
        per_row = [torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(x0[sl]) for v in leaves]
        batched = [v for v, b in zip(leaves, per_row) if b]
        g = vmap(grad(_one_sample_loss(den, module, leaves, per_row, spec)), in_dims=(None, 0, 0, 0, 0))
        # no_grad keeps the parameters not substituted here (which require grad) from recording an outer
        # graph; torch.func.grad computes its own gradients regardless.
        with warnings.catch_warnings(), torch.no_grad():  # functorch's "no batching rule" notices: slower, still exact
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = g(params, x0[sl], noise[sl], t[sl], batched)
        for k, v in grads.items():
            acc[k] += v.pow(2).sum(0)
    return acc


def _hooks(den: Denoiser, names: list[str], x0, noise, t, rows, chunk: int) -> dict[str, torch.Tensor]:
    wanted = set(names)
    owners = []
    for mod_name, mod in den.module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        own = [prefix + p for p, _ in mod.named_parameters(recurse=False)]
        if own and all(n in wanted for n in own):
            owners.append((mod_name, mod))
    acc: dict[str, torch.Tensor] = {}
    for i in range(0, len(x0), chunk):
        sl = slice(i, i + chunk)

        def losses(sl=sl):
            return den.losses(x0[sl], noise[sl], t[sl], None if rows is None else rows[sl])

        for k, v in hook_sq_grads(den.module, losses, owners=owners).items():
            acc[k] = acc[k] + v if k in acc else v
    return {n: acc[n] for n in names}


def sq_grads(den: Denoiser, x0, noise, t, rows=None, *, method: str = "hooks", chunk: int = 64,
             methods: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Sum over samples of squared per-sample gradients {name: like the parameter}, and each name's method."""
    methods = dict(methods or plan_methods(den, x0, noise, t, rows, method))
    flags = [(p, p.requires_grad) for p in den.module.parameters()]
    for p, _ in flags:  # a frozen model (requires_grad False) still has gradients to score
        p.requires_grad_(True)
    try:
        return _sq_grads(den, x0, noise, t, rows, method, chunk, methods), methods
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _sq_grads(den, x0, noise, t, rows, method, chunk, methods) -> dict[str, torch.Tensor]:
    acc: dict[str, torch.Tensor] = {}
    hooked = [n for n, m in methods.items() if m == "hooks"]
    if hooked:
        acc.update(_hooks(den, hooked, x0, noise, t, rows, chunk))
    vm = [n for n, m in methods.items() if m == "vmap"]
    if vm:
        try:
            acc.update(_vmap(den, vm, x0, noise, t, rows, chunk))
        except (RuntimeError, NotImplementedError, TypeError) as e:  # an op without a functorch rule
            if method == "vmap":
                raise ValueError(f"vmap cannot run this model ({str(e).splitlines()[0]}); use method='naive'") from None
            for n in vm:
                methods[n] = "naive"
    naive = [n for n, m in methods.items() if m == "naive"]
    if naive:
        acc.update(_naive(den, naive, x0, noise, t, rows))
    return acc
