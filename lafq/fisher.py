"""Empirical Fisher of the denoising loss, per weight tensor and timestep bin.

F[k, b] = mean over samples s in bin b of mean over elements i of tensor k of (dL_s / dθ_i)²

with per-sample gradients computed in batched passes, not by squaring a mini-batch gradient (which
would give the squared *mean* gradient instead). Three exact methods: layer hooks (the default,
lafq.persample), `torch.func.vmap` over `grad`, and a naive per-sample loop as the reference.
Also kept: the same mean per output channel (what INT8/INT4 per-channel quantization perturbs
together), and the mean |w| of every tensor (the weight-magnitude map).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .checkpoint import load_file, save_file, state_digest  # noqa: F401 (state_digest: re-exported)
from .device import model_device
from .distributed import all_reduce_sum_, shard, world
from .diffusion import Schedule, linear_schedule, q_sample
from .model import LAYERS, layer_of
from .persample import hook_sq_grads

STATISTICS = ("final", "mean", "max")
METHODS = ("hooks", "vmap", "naive")  # all exact; hooks is the fastest on CPU (docs/benchmarks.md)
VIEWS = ("raw", "normalized", "log")
MAX_BINS = 1000
DEFAULT_P_NULL = 0.1  # the training label dropout (TrainConfig.p_uncond): how often sampling's null branch is seen


@dataclass
class FisherMap:
    names: list[str]  # fully qualified parameter names, model order
    numels: list[int]
    bin_edges: list[int]  # timestep bins [edges[b], edges[b+1]), len = bins + 1
    groups: list[str]  # "all", then class ids as strings when computed per class
    fisher: torch.Tensor  # (groups, tensors, bins), float64: per-element mean squared gradient
    magnitude: torch.Tensor  # (tensors,): mean |w|
    channel: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (groups, bins, out_channels)
    meta: dict = field(default_factory=dict)  # samples per bin, seed, checkpoint digest, seconds

    @property
    def bins(self) -> int:
        return len(self.bin_edges) - 1

    def bin_centers(self) -> list[float]:
        return [(a + b - 1) / 2 for a, b in zip(self.bin_edges[:-1], self.bin_edges[1:])]

    def group_index(self, group: str | int = "all") -> int:
        g = str(group)
        if g not in self.groups:
            raise ValueError(f"this Fisher map has groups {self.groups}; no {g!r} (compute it with per_class=True)")
        return self.groups.index(g)

    def view(self, kind: str = "raw", group: str | int = "all", per_layer: bool = False) -> tuple[list[str], torch.Tensor]:
        """(row names, matrix rows × bins): raw, normalized by its maximum (the source's eq. 2), or log10 of that."""
        if kind not in VIEWS:
            raise ValueError(f"unknown view {kind!r}; choose one of {VIEWS}")
        names, m = (self.layer_names(), self.per_layer(group)) if per_layer else (self.names, self.fisher[self.group_index(group)])
        if kind == "raw":
            return names, m
        norm = m / m.max().clamp_min(1e-300)
        return names, norm if kind == "normalized" else torch.log10(norm.clamp_min(1e-12))

    def layer_names(self) -> list[str]:
        """The U-Net's layers in network order; any other model's top-level modules in parameter order."""
        present = list(dict.fromkeys(layer_of(n) for n in self.names))
        return [layer for layer in LAYERS if layer in present] + [layer for layer in present if layer not in LAYERS]

    def per_layer(self, group: str | int = "all") -> torch.Tensor:
        """(layers, bins): element-weighted mean over the layer's tensors, i.e. trace / numel of the layer."""
        m = self.fisher[self.group_index(group)]
        numel = torch.tensor(self.numels, dtype=m.dtype)
        rows = []
        for layer in self.layer_names():
            idx = [i for i, n in enumerate(self.names) if layer_of(n) == layer]
            rows.append((m[idx] * numel[idx, None]).sum(0) / numel[idx].sum())
        return torch.stack(rows)

    def layer_magnitude(self) -> tuple[list[str], torch.Tensor]:
        numel = torch.tensor(self.numels, dtype=self.magnitude.dtype)
        layers = self.layer_names()
        vals = [(self.magnitude[i] * numel[i]).sum() / numel[i].sum() for i in
                ([j for j, n in enumerate(self.names) if layer_of(n) == layer] for layer in layers)]
        return layers, torch.stack(vals)

    def score(self, statistic: str = "mean", group: str | int = "all") -> dict[str, float]:
        """One number per tensor: Fisher at the final denoising step (t=0 bin, as the source), or its mean / max over bins."""
        m = self.fisher[self.group_index(group)]
        if statistic == "final":
            v = m[:, 0]
        elif statistic == "mean":
            v = m.mean(1)
        elif statistic == "max":
            v = m.max(1).values
        else:
            raise ValueError(f"unknown timestep statistic {statistic!r}; choose one of {STATISTICS}")
        return dict(zip(self.names, v.tolist()))

    def magnitude_score(self) -> dict[str, float]:
        """One number per tensor: its mean |w| (the weight-magnitude signal)."""
        return dict(zip(self.names, self.magnitude.tolist()))

    def channel_score(self, name: str, statistic: str = "mean", group: str | int = "all") -> torch.Tensor | None:
        """Per-output-channel Fisher of one tensor under the same statistic, or None if not kept."""
        if name not in self.channel:
            return None
        c = self.channel[name][self.group_index(group)]  # (bins, C)
        return {"final": lambda: c[0], "mean": lambda: c.mean(0), "max": lambda: c.max(0).values}[statistic]()

    # -- files -------------------------------------------------------------------------------
    def save(self, path) -> None:
        tensors = {"fisher": self.fisher, "magnitude": self.magnitude}
        tensors.update({f"channel.{k}": v for k, v in self.channel.items()})
        save_file(path, tensors, {"kind": "fisher", "names": self.names, "numels": self.numels,
                                  "bin_edges": self.bin_edges, "groups": self.groups, "info": self.meta})

    @classmethod
    def load(cls, path) -> "FisherMap":
        """The map in a file `save` wrote; a one-line CheckpointError for a file that is not a complete map."""
        from .checkpoint import CheckpointError

        tensors, meta = load_file(path, kind="fisher")
        try:
            channel = {k[8:]: v for k, v in tensors.items() if k.startswith("channel.")}
            return cls(meta["names"], meta["numels"], meta["bin_edges"], meta["groups"], tensors["fisher"],
                       tensors["magnitude"], channel, meta.get("info", {}))
        except (KeyError, TypeError, IndexError) as e:
            raise CheckpointError(f"{path} is not a complete Fisher map (missing or malformed {str(e)[:60]})") from None


def bin_edges(bins: int, T: int = 1000) -> list[int]:
    if not 1 <= bins <= min(T, MAX_BINS):
        raise ValueError(f"bins must be in [1, {min(T, MAX_BINS)}], got {bins}")
    return torch.linspace(0, T, bins + 1).round().long().tolist()


def _loss_fn(model, schedule):
    def loss(params, x0, y, t, noise):
        xt = q_sample(schedule, x0[None], t[None], noise[None])
        pred = functional_call(model, params, (xt, t[None], y[None]))
        return F.mse_loss(pred, noise[None])
    return loss


def per_sample_sq_grads(model, schedule, x0, y, t, noise, chunk: int = 64) -> dict[str, torch.Tensor]:
    """Sum over samples of squared per-sample gradients, {name: tensor shaped like the parameter}."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = vmap(grad(_loss_fn(model, schedule)), in_dims=(None, 0, 0, 0, 0))
    acc = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(0, len(x0), chunk):
        with warnings.catch_warnings():  # functorch's "no batching rule for CPU attention": known, measured
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = g(params, x0[i:i + chunk], y[i:i + chunk], t[i:i + chunk], noise[i:i + chunk])
        for k, v in grads.items():
            acc[k] += v.pow(2).sum(0)
    return acc


def hooked_sq_grads(model, schedule, x0, y, t, noise, chunk: int = 64) -> dict[str, torch.Tensor]:
    """The same sum from batched backward passes with layer hooks (lafq.persample): fastest on a CPU."""
    acc: dict[str, torch.Tensor] = {}
    for i in range(0, len(x0), chunk):
        sl = slice(i, i + chunk)

        def losses(sl=sl):
            pred = model(q_sample(schedule, x0[sl], t[sl], noise[sl]), t[sl], y[sl])
            return F.mse_loss(pred, noise[sl], reduction="none").flatten(1).mean(1)

        for k, v in hook_sq_grads(model, losses).items():
            acc[k] = acc[k] + v if k in acc else v
    return acc


def naive_sq_grads(model, schedule, x0, y, t, noise) -> dict[str, torch.Tensor]:
    """The same sum by one backward pass per sample: the reference the vectorised path is tested against."""
    acc = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for i in range(len(x0)):
        model.zero_grad(set_to_none=True)
        xt = q_sample(schedule, x0[i:i + 1], t[i:i + 1], noise[i:i + 1])
        F.mse_loss(model(xt, t[i:i + 1], y[i:i + 1]), noise[i:i + 1]).backward()
        for k, p in model.named_parameters():
            acc[k] += p.grad.pow(2)
    model.zero_grad(set_to_none=True)
    return acc


def _balanced_draw(labels: torch.Tensor, classes: list[int], n: int, gen: torch.Generator) -> torch.Tensor:
    """n indices into the dataset, cycling through `classes` so each is equally represented."""
    pools = {c: (labels == c).nonzero().flatten() for c in classes}
    empty = [c for c, p in pools.items() if len(p) == 0]
    if empty:
        raise ValueError(f"the data has no images of class(es) {empty}: Fisher maps need every class they average over")
    want = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return torch.stack([pools[int(c)][torch.randint(len(pools[int(c)]), (1,), generator=gen)][0] for c in want])


def compute_fisher(model, images: torch.Tensor, labels: torch.Tensor, *, bins: int = 50, samples_per_bin: int = 64,
                   per_class: bool = False, schedule: Schedule | None = None, seed: int = 0, chunk: int = 64,
                   progress: Callable[[int, int], None] | None = None, method: str = "hooks",
                   p_null: float = DEFAULT_P_NULL) -> FisherMap:
    """Fisher map of `model` on data (images float (N,1,28,28) in [-1,1], labels long (N,)).

    Per bin, `samples_per_bin` (x0, class, t, noise) draws: t uniform in the bin, x0 class-balanced.
    Each draw's label is replaced by the null class with probability `p_null` (the training label
    dropout, 0.1): guided sampling runs the null-class branch at every step, so its weights (the
    null row of the class embedding) must be scored too; p_null=0 gives the conditional-only map.
    per_class=True computes each digit's map with that many samples each; "all" is their mean.
    The loss is the unweighted eps-MSE (training used min-SNR-5 weighting; the map does not).
    """
    if samples_per_bin < 1:
        raise ValueError(f"samples_per_bin must be at least 1, got {samples_per_bin}")
    if not 0 <= p_null <= 1:
        raise ValueError(f"p_null must be in [0, 1], got {p_null}")
    schedule = schedule or linear_schedule()
    edges = bin_edges(bins, schedule.T)
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic network
    gen = torch.Generator().manual_seed(seed)  # draws on the CPU: the same samples whatever the model's device
    dev = model_device(model)
    names = [k for k, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    classes = list(range(model.cfg.num_classes)) if model.cfg.num_classes else [None]
    groups = [[c] for c in classes] if per_class else [classes]
    fisher = torch.zeros(len(groups), len(names), bins, dtype=torch.float64)
    channel = {k: torch.zeros(len(groups), bins, p.shape[0], dtype=torch.float64) for k, p in params.items() if p.dim() > 1}
    if method not in METHODS:
        raise ValueError(f"unknown per-sample gradient method {method!r}; choose one of {METHODS}")
    sq = {"hooks": hooked_sq_grads, "vmap": per_sample_sq_grads,
          "naive": lambda m, s, *a, chunk: naive_sq_grads(m, s, *a)}[method]
    total, done = len(groups) * bins, 0
    t0 = time.perf_counter()
    try:
        for gi, group in enumerate(groups):
            for b in range(bins):
                idx = _balanced_draw(labels, group, samples_per_bin, gen) if group != [None] else \
                    torch.randint(len(images), (samples_per_bin,), generator=gen)
                x0 = images[idx]
                y = labels[idx] if group != [None] else torch.full((samples_per_bin,), 0)
                t = torch.randint(edges[b], edges[b + 1], (samples_per_bin,), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                if p_null > 0 and model.cfg.num_classes:  # drawn after the rest: p_null=0 keeps earlier maps' draws
                    y = torch.where(torch.rand(samples_per_bin, generator=gen) < p_null, model.cfg.num_classes, y)
                part = shard(samples_per_bin)  # every process drew the whole batch; this one scores its share
                if len(t[part]):
                    acc = sq(model, schedule, *(v[part].to(dev) for v in (x0, y, t, noise)), chunk=chunk)
                    for k, name in enumerate(names):
                        g2 = acc[name].double().cpu() / samples_per_bin
                        fisher[gi, k, b] = g2.mean()
                        if name in channel:
                            channel[name][gi, b] = g2.flatten(1).mean(1)
                done += 1
                if progress:
                    progress(done, total)
    finally:  # a cancelled run (progress raising) leaves the model as it found it
        model.train(was_training)
    all_reduce_sum_(fisher, *channel.values())  # the shards' partial sums: one process's map, to float32 rounding
    if per_class:  # "all" = the class-balanced mean, first
        fisher = torch.cat([fisher.mean(0, keepdim=True), fisher])
        channel = {k: torch.cat([v.mean(0, keepdim=True), v]) for k, v in channel.items()}
    group_names = ["all"] + ([str(c) for c in classes] if per_class else [])
    magnitude = torch.stack([p.detach().abs().mean().double().cpu() for p in params.values()])
    info = {"samples_per_bin": samples_per_bin, "seed": seed, "method": method, "checkpoint_digest": state_digest(model),
            "seconds": round(time.perf_counter() - t0, 2), "loss": f"eps-MSE, unweighted; null class with probability {p_null:g}", "p_null": p_null,
            "processes": world()}
    return FisherMap(names, [p.numel() for p in params.values()], edges, group_names, fisher, magnitude, channel, info)
