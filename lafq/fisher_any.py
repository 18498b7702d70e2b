"""Fisher maps for any denoiser (a lafq.models.Denoiser): the same quantity as lafq.fisher, keyed by
the model's own parameter names.

F[k, b] = mean over draws s in bin b of mean over elements i of tensor k of (dL_s / dθ_i)²,
L_s = mean over elements of (prediction - target)², target by the scheduler's prediction type.

Per-sample gradients, all exact, chosen per parameter:
    hooks   one batched backward with layer hooks (lafq.persample) for every module the hooks can
            split (Linear, Conv2d, GroupNorm, LayerNorm, Embedding) and that runs once per forward
    vmap    `torch.func.vmap(grad)` over the remaining parameters (other layer types, reused modules)
    naive   one backward per sample: where vmap fails on an operation, and the reference
`method="hooks"` uses hooks where it can and falls back parameter by parameter (vmap, else naive);
the map's metadata names each parameter's method. Draws: x0 uniform from the images given,
t uniform in the bin, fresh Gaussian noise, one conditioning row uniform from the captured ones
(or, given `image_rows`, the image's own row, e.g. its class label, with label dropout `p_null`).

`lafq.fisher.compute_fisher` stays the path for the project's U-Net (class-balanced draws, the
null-label rate of training): its shipped map is unchanged.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .distributed import all_reduce_sum_, shard, world
from .fisher import FisherMap, bin_edges, state_digest
from .models.base import Denoiser
from .persample import hook_sq_grads, hookable

METHODS = ("hooks", "vmap", "naive")


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
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

        pred = den.call(fn, den.noisy(x[None], n[None], tt[None]), tt[None], kwargs)
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


def _check_image_rows(den: Denoiser, images: torch.Tensor, image_rows: torch.Tensor, p_null: float) -> None:
    if den.conditioning is None:
        raise ValueError("image_rows pick conditioning rows: the denoiser has no conditioning")
    if tuple(image_rows.shape) != (len(images),):
        raise ValueError(f"image_rows needs one row per image: {len(images)}, got shape {tuple(image_rows.shape)}")
    if len(image_rows) and (int(image_rows.min()) < 0 or int(image_rows.max()) >= den.conditioning.rows):
        raise ValueError(f"image_rows must be in [0, {den.conditioning.rows}), got {int(image_rows.min())}.."
                         f"{int(image_rows.max())}")
    if not 0.0 <= p_null <= 1.0:
        raise ValueError(f"p_null must be in [0, 1], got {p_null}")
    if p_null > 0 and den.null_row is None:
        raise ValueError("p_null > 0 needs the unconditional conditioning row (null_row); this denoiser has none")


def fisher_map(den: Denoiser, images: torch.Tensor, *, bins: int = 50, samples_per_bin: int = 64, seed: int = 0,
               chunk: int = 64, method: str = "hooks", progress: Callable[[int, int], None] | None = None,
               image_rows: torch.Tensor | None = None, p_null: float = 0.0) -> FisherMap:
    """Fisher map of any denoiser on clean samples `images` (N, *den.sample_shape), e.g. VAE latents.

    `image_rows` (N,), optional: the conditioning row of each image (its class label for a class-conditional
    model), replaced by the unconditional row `den.null_row` with probability `p_null` (the label dropout
    of training); without it, rows are drawn uniformly and independently of the images.
    """
    if samples_per_bin < 1:
        raise ValueError(f"samples_per_bin must be at least 1, got {samples_per_bin}")
    if image_rows is not None:
        _check_image_rows(den, images, image_rows, p_null)
    if tuple(images.shape[1:]) != den.sample_shape:
        raise ValueError(f"images have shape {tuple(images.shape[1:])} per sample; the model takes {den.sample_shape}")
    module = den.module
    edges = bin_edges(bins, den.T)
    dtype = _param_dtype(module)
    dev = next(module.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # draws on the CPU: the same samples on any device
    params = dict(module.named_parameters())
    names = list(params)
    fisher = torch.zeros(1, len(names), bins, dtype=torch.float64)
    channel = {k: torch.zeros(1, bins, p.shape[0], dtype=torch.float64) for k, p in params.items() if p.dim() > 1}
    was_training = module.training
    module.eval()
    methods = None
    t0 = time.perf_counter()
    try:
        for b in range(bins):
            idx = torch.randint(len(images), (samples_per_bin,), generator=gen)
            t = torch.randint(edges[b], edges[b + 1], (samples_per_bin,), generator=gen)
            noise = torch.randn((samples_per_bin, *den.sample_shape), generator=gen, dtype=dtype)
            if image_rows is not None:  # each image's own row; the null row at the label-dropout rate
                rows = image_rows[idx].long()
                drop = torch.rand(samples_per_bin, generator=gen) < p_null
                if drop.any():
                    rows[drop] = den.null_row
            else:
                rows = (torch.randint(den.conditioning.rows, (samples_per_bin,), generator=gen)
                        if den.conditioning is not None else None)
            part = shard(samples_per_bin)  # every process drew the whole batch; this one scores its share
            if len(t[part]):
                x0 = images[idx[part]].to(device=dev, dtype=dtype)
                acc, methods = sq_grads(den, x0, noise[part].to(dev), t[part].to(dev),
                                        rows[part] if rows is not None else None, method=method, chunk=chunk,
                                        methods=methods)
                for k, name in enumerate(names):
                    g2 = acc[name].double().cpu() / samples_per_bin
                    fisher[0, k, b] = g2.mean()
                    if name in channel:
                        channel[name][0, b] = g2.flatten(1).mean(1)
            if progress:
                progress(b + 1, bins)
    finally:
        module.train(was_training)
    all_reduce_sum_(fisher, *channel.values())  # the shards' partial sums: one process's map, to float32 rounding
    methods = methods or {}
    magnitude = torch.stack([p.detach().abs().mean().double().cpu() for p in params.values()])
    by_method = {m: sorted(n for n, v in methods.items() if v == m) for m in METHODS}
    info = {"samples_per_bin": samples_per_bin, "seed": seed, "method": method,
            "methods": {m: len(v) for m, v in by_method.items()},
            "fallback": {m: v for m, v in by_method.items() if m != method and v},
            "checkpoint_digest": state_digest(module), "seconds": round(time.perf_counter() - t0, 2),
            "prediction_type": den.prediction_type, "processes": world(),
            "loss": f"MSE to the {den.prediction_type} target, unweighted; " + (
                f"each image's conditioning row, the null row with p={p_null:g}" if image_rows is not None
                else "conditioning rows uniform"),
            "model": {k: v for k, v in den.source.items() if k != "config"}}
    return FisherMap(names, [p.numel() for p in params.values()], edges, ["all"], fisher, magnitude, channel, info)
