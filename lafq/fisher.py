"""Empirical Fisher of the denoising loss, per weight tensor and timestep bin.

F[k, b] = mean over samples s in bin b of mean over elements i of tensor k of (dL_s / dθ_i)²

with per-sample gradients computed in batched passes, not by squaring a mini-batch gradient (which
would give the squared *mean* gradient instead). Three exact methods: layer hooks (the default,
lafq.persample), `torch.func.vmap` over `grad`, and a naive per-sample loop as the reference.
Also kept: the same mean per output channel (what INT8/INT4 per-channel quantization perturbs
together), and the mean |w| of every tensor (the weight-magnitude map).

One function for every model: `fisher_map(den, images, labels=..., draws=..., per_class=..., p_null=...)`
takes a `lafq.models.Denoiser` (the project U-Net through `from_lafq_unet`, a diffusers model through
`from_diffusers`), scores the model's own training target and keys the map by its parameter names.
`compute_fisher(unet, images, labels)` is the shipped map's recipe on that path (class-balanced draws,
null class at 0.1): recomputing it gives the shipped map's numbers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .checkpoint import load_file, save_file, state_digest  # noqa: F401 (state_digest: re-exported)
from .device import model_device
from .distributed import all_reduce_sum_, shard, world
from .diffusion import Schedule
from .persample import METHODS, param_dtype, sq_grads

if TYPE_CHECKING:
    from .models.base import Denoiser

STATISTICS = ("final", "mean", "max")
DRAWS = ("uniform", "balanced")
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

    def layers(self):
        """The model's layer vocabulary (lafq.layers) from the map's names (matrices: those with channel rows)."""
        from .layers import layers_of
        return layers_of({n: (2, 2) if n in self.channel else (1,) for n in self.names})

    def _layer_index(self) -> list[tuple[str, list[int]]]:
        at = {n: i for i, n in enumerate(self.names)}
        return [(layer, [at[n] for n in members]) for layer, members in self.layers().members().items()]

    def layer_names(self) -> list[str]:
        """The model's layers in the order the sample flows (the U-Net's: embed, stem, down1, ..., head)."""
        return list(self.layers().order)

    def per_layer(self, group: str | int = "all") -> torch.Tensor:
        """(layers, bins): element-weighted mean over the layer's tensors, i.e. trace / numel of the layer."""
        m = self.fisher[self.group_index(group)]
        numel = torch.tensor(self.numels, dtype=m.dtype)
        return torch.stack([(m[idx] * numel[idx, None]).sum(0) / numel[idx].sum() for _, idx in self._layer_index()])

    def layer_magnitude(self) -> tuple[list[str], torch.Tensor]:
        numel = torch.tensor(self.numels, dtype=self.magnitude.dtype)
        rows = self._layer_index()
        vals = [(self.magnitude[idx] * numel[idx]).sum() / numel[idx].sum() for _, idx in rows]
        return [layer for layer, _ in rows], torch.stack(vals)

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


def _balanced_draw(labels: torch.Tensor, classes: list[int], n: int, gen: torch.Generator) -> torch.Tensor:
    """n indices into the dataset, cycling through `classes` so each is equally represented."""
    pools = {c: (labels == c).nonzero().flatten() for c in classes}
    empty = [c for c, p in pools.items() if len(p) == 0]
    if empty:
        raise ValueError(f"the data has no images of class(es) {empty}: Fisher maps need every class they average over")
    want = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return torch.stack([pools[int(c)][torch.randint(len(pools[int(c)]), (1,), generator=gen)][0] for c in want])


def classes_of(den: Denoiser) -> list[int]:
    """The conditioning rows that are classes: every captured row but the unconditional one."""
    if den.conditioning is None:
        return []
    return [r for r in range(den.conditioning.rows) if r != den.null_row]


def _check_labels(den: Denoiser, images: torch.Tensor, labels: torch.Tensor, p_null: float) -> None:
    if den.conditioning is None:
        raise ValueError("labels pick conditioning rows: this model has no conditioning")
    if tuple(labels.shape) != (len(images),):
        raise ValueError(f"labels need one row per image: {len(images)}, got shape {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= den.conditioning.rows):
        raise ValueError(f"labels must be conditioning rows in [0, {den.conditioning.rows}), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    if p_null > 0 and den.null_row is None:
        raise ValueError("p_null > 0 needs the unconditional conditioning row (null_row); this model has none")


def fisher_map(den: Denoiser, images: torch.Tensor, *, labels: torch.Tensor | None = None, draws: str = "uniform",
               per_class: bool = False, p_null: float | None = None, bins: int = 50, samples_per_bin: int = 64,
               seed: int = 0, chunk: int = 64, method: str = "hooks",
               progress: Callable[[int, int], None] | None = None) -> FisherMap:
    """Fisher map of any denoiser on clean samples `images` (N, *den.sample_shape), e.g. VAE latents.

    Per bin, `samples_per_bin` draws (x0, conditioning row, t, noise), all from one CPU generator seeded
    with `seed` (the same draws on any device): x0 from the images, t uniform in the bin, Gaussian noise.
      labels     (N,), optional: each image's conditioning row (its class for a class-conditional model).
                 Without labels, rows are drawn uniformly from the captured ones, independently of x0.
      draws      "uniform": x0 uniform over the images; "balanced": cycling through the classes
                 (`classes_of(den)`) so each is equally represented (needs labels).
      per_class  one map per class with `samples_per_bin` draws each; group "all" is their mean.
      p_null     each labelled draw's row is replaced by the unconditional row with this probability:
                 guided sampling runs the null branch at every step, so its weights must be scored.
                 None: 0.1 (the training label dropout) where labels are given and the model has a
                 null row, else 0. Its uniform draw comes after the others, only when p_null > 0.
    The loss is the unweighted MSE to the model's training target (`Denoiser.losses`).
    """
    if samples_per_bin < 1:
        raise ValueError(f"samples_per_bin must be at least 1, got {samples_per_bin}")
    if draws not in DRAWS:
        raise ValueError(f"unknown draws {draws!r}; choose one of {DRAWS}")
    if tuple(images.shape[1:]) != den.sample_shape:
        raise ValueError(f"images have shape {tuple(images.shape[1:])} per sample; the model takes {den.sample_shape}")
    if p_null is None:
        p_null = DEFAULT_P_NULL if labels is not None and den.null_row is not None else 0.0
    if not 0.0 <= p_null <= 1.0:
        raise ValueError(f"p_null must be in [0, 1], got {p_null}")
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        _check_labels(den, images, labels, p_null)
    elif draws == "balanced" or per_class:
        raise ValueError("class-balanced draws and per-class maps need labels (each image's class)")
    elif p_null > 0:
        raise ValueError("p_null replaces the rows of labelled draws: give labels, or p_null=0")
    if method not in METHODS:
        raise ValueError(f"unknown per-sample gradient method {method!r}; choose one of {METHODS}")
    den.require_inputs()
    if getattr(den.module, "lafq_plan", None) is not None:
        raise ValueError("compute Fisher maps on the FP32 model, not a quantized one")
    classes = classes_of(den)
    groups = [[c] for c in classes] if per_class else [classes]
    module = den.module
    edges = bin_edges(bins, den.T)
    dtype = param_dtype(module)
    dev = model_device(module)
    gen = torch.Generator().manual_seed(seed)  # draws on the CPU: the same samples on any device
    params = dict(module.named_parameters())
    names = list(params)
    fisher = torch.zeros(len(groups), len(names), bins, dtype=torch.float64)
    channel = {k: torch.zeros(len(groups), bins, p.shape[0], dtype=torch.float64) for k, p in params.items() if p.dim() > 1}
    was_training = module.training
    module.eval()  # no dropout: the Fisher of the deterministic network
    methods = None
    total, done = len(groups) * bins, 0
    t0 = time.perf_counter()
    try:
        for gi, group in enumerate(groups):
            for b in range(bins):
                if per_class or draws == "balanced":
                    idx = _balanced_draw(labels, group, samples_per_bin, gen)
                else:
                    idx = torch.randint(len(images), (samples_per_bin,), generator=gen)
                t = torch.randint(edges[b], edges[b + 1], (samples_per_bin,), generator=gen)
                noise = torch.randn((samples_per_bin, *den.sample_shape), generator=gen, dtype=dtype)
                if labels is not None:  # each image's own row; the null row at the label-dropout rate
                    rows = labels[idx].clone()
                    if p_null > 0:
                        rows[torch.rand(samples_per_bin, generator=gen) < p_null] = den.null_row
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
                        fisher[gi, k, b] = g2.mean()
                        if name in channel:
                            channel[name][gi, b] = g2.flatten(1).mean(1)
                done += 1
                if progress:
                    progress(done, total)
    finally:  # a cancelled run (progress raising) leaves the model as it found it
        module.train(was_training)
    all_reduce_sum_(fisher, *channel.values())  # the shards' partial sums: one process's map, to float32 rounding
    if per_class:  # "all" = the class-balanced mean, first
        fisher = torch.cat([fisher.mean(0, keepdim=True), fisher])
        channel = {k: torch.cat([v.mean(0, keepdim=True), v]) for k, v in channel.items()}
    group_names = ["all"] + ([str(c) for c in classes] if per_class else [])
    methods = methods or {}
    magnitude = torch.stack([p.detach().abs().mean().double().cpu() for p in params.values()])
    by_method = {m: sorted(n for n, v in methods.items() if v == m) for m in METHODS}
    info = {"samples_per_bin": samples_per_bin, "seed": seed, "method": method, "draws": draws, "p_null": p_null,
            "methods": {m: len(v) for m, v in by_method.items()},
            "fallback": {m: v for m, v in by_method.items() if m != method and v},
            "checkpoint_digest": state_digest(module), "seconds": round(time.perf_counter() - t0, 2),
            "prediction_type": den.prediction_type, "processes": world(),
            "loss": f"MSE to the {den.prediction_type} target, unweighted; " + (
                f"each image's conditioning row, the null row with p={p_null:g}" if labels is not None
                else "conditioning rows uniform" if den.conditioning is not None else "unconditional"),
            "model": {k: v for k, v in den.source.items() if k != "config"}}
    return FisherMap(names, [p.numel() for p in params.values()], edges, group_names, fisher, magnitude, channel, info)


def compute_fisher(model, images: torch.Tensor, labels: torch.Tensor, *, bins: int = 50, samples_per_bin: int = 64,
                   per_class: bool = False, schedule: Schedule | None = None, seed: int = 0, chunk: int = 64,
                   progress: Callable[[int, int], None] | None = None, method: str = "hooks",
                   p_null: float = DEFAULT_P_NULL) -> FisherMap:
    """The project U-Net's map as shipped: `fisher_map` through its adapter, class-balanced draws, the
    null class at the training dropout rate (0.1). Images (N,1,28,28) in [-1,1], labels (N,) class ids."""
    from .models.lafq_unet import from_lafq_unet

    den = from_lafq_unet(model, schedule)
    conditional = den.conditioning is not None
    return fisher_map(den, images, labels=labels if conditional else None,
                      draws="balanced" if conditional else "uniform", per_class=per_class,
                      p_null=p_null if conditional else 0.0, bins=bins, samples_per_bin=samples_per_bin, seed=seed,
                      chunk=chunk, method=method, progress=progress)
