"""Policies turn a Fisher map into a Plan: fully qualified parameter name -> precision.

Strategies (each tensor ends in `policy.high` or `policy.target`, except budget and random):
    uniform       every tensor to target
    global        tensors whose max-normalized Fisher score is <= threshold
    groups        the same, with one threshold per layer group (groups configurable)
    layer-ratio   in each layer, the floor(p * n) tensors of lowest score (p=0: none, p=1: all)
    layer-std     in each layer, tensors whose log10 score is below mean + k * std of that layer
    budget        FP32/FP16/INT8/INT4 per tensor minimising the predicted loss increase
                  sum_k F_k * ||Q(w_k) - w_k||^2 (FIT / HAWQ-V3) under a size budget
    random        a random allocation down to a size budget: the control for "does Fisher matter"
`protect_mid` keeps every `mid` tensor in high precision. Integer targets apply to matrices;
vectors (biases, norms) fall back to fp16 (see precision.fallback).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field

import torch

from .fisher import STATISTICS, FisherMap
from .model import layer_of
from .precision import BITS, PRECISIONS, check_precision, fallback, numel, roundtrip, supports, tensor_bytes

STRATEGIES = ("uniform", "global", "groups", "layer-ratio", "layer-std", "budget", "random")
DEFAULT_GROUPS = {"encoder": ["embed", "stem", "down1", "down2", "down3"], "mid": ["mid"],
                  "decoder": ["up3", "up2", "up1", "head"]}
BUDGET_CHOICES = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class Policy:
    strategy: str = "layer-ratio"
    target: str = "fp16"
    high: str = "fp32"
    statistic: str = "final"  # which Fisher number per tensor: final step (t=0 bin, as the source), mean, max
    threshold: float = 0.01  # global: on max-normalized scores in [0, 1]
    group_thresholds: dict = field(default_factory=lambda: {"encoder": 0.0, "mid": 1.0, "decoder": 1.0})
    groups: dict = field(default_factory=lambda: dict(DEFAULT_GROUPS))
    p: float = 0.25  # layer-ratio
    k: float = 0.0  # layer-std
    protect_mid: bool = False
    avg_bits: float | None = None  # budget / random: average bits per weight, scales included
    budget_bytes: int | None = None  # ... or total bytes
    seed: int = 0  # random
    lower_to: tuple[str, ...] = ("fp16", "int8", "int4")  # random: the precisions tensors may be lowered to
    fisher_group: str = "all"  # which class's map drives the scores

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        check_precision(self.target)
        check_precision(self.high)
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown timestep statistic {self.statistic!r}; choose one of {STATISTICS}")
        for name, v in [("threshold", self.threshold), ("p", self.p), ("k", self.k)]:
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
        if not 0 <= self.p <= 1:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1] (a fraction of the largest Fisher score), got {self.threshold}")
        bad = {g: t for g, t in self.group_thresholds.items() if not (math.isfinite(t) and 0 <= t <= 1)}
        if bad:
            raise ValueError(f"group thresholds must be in [0, 1], got {bad}")
        unknown = set(self.group_thresholds) - set(self.groups)
        if unknown:
            raise ValueError(f"thresholds for unknown groups {sorted(unknown)}; groups are {sorted(self.groups)}")
        if self.strategy in ("budget", "random") and self.avg_bits is None and self.budget_bytes is None:
            raise ValueError(f"strategy {self.strategy!r} needs avg_bits or budget_bytes")
        object.__setattr__(self, "lower_to", tuple(self.lower_to))  # JSON round trips give lists
        if not self.lower_to:
            raise ValueError("lower_to needs at least one precision")
        for p in self.lower_to:
            check_precision(p)
        if self.avg_bits is not None and not (math.isfinite(self.avg_bits) and 0 < self.avg_bits <= 32):
            raise ValueError(f"avg_bits must be in (0, 32], got {self.avg_bits}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    precisions: dict[str, str]  # every parameter's FQN -> precision it is stored in
    policy: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": 1, "precisions": self.precisions, "policy": self.policy}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
            prec = d["precisions"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"not a LAFQ plan (JSON with a 'precisions' object): {e}") from None
        for name, p in prec.items():
            check_precision(p)
        return cls(dict(prec), d.get("policy", {}))

    def validate(self, shapes: dict[str, tuple]) -> None:
        """Every parameter named exists in the model, and every precision fits its tensor."""
        unknown = sorted(set(self.precisions) - set(shapes))
        if unknown:
            raise ValueError(f"plan names {len(unknown)} parameters the model lacks (e.g. {unknown[:3]})")
        bad = [f"{n}: {p} on shape {shapes[n]}" for n, p in self.precisions.items() if not supports(shapes[n], p)]
        if bad:
            raise ValueError(f"plan asks for integer formats on vectors: {bad[:3]}")

    def counts(self) -> dict[str, int]:
        out = {p: 0 for p in PRECISIONS}
        for p in self.precisions.values():
            out[p] += 1
        return out


def param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def plan_bytes(precisions: dict[str, str], shapes: dict[str, tuple]) -> int:
    return sum(tensor_bytes(shapes[n], precisions.get(n, "fp32")) for n in shapes)


def _two_level(names, shapes, chosen: set[str], policy: Policy) -> dict[str, str]:
    return {n: fallback(shapes[n], policy.target) if n in chosen else policy.high for n in names}


def _normalized(scores: dict[str, float]) -> dict[str, float]:
    top = max(scores.values()) or 1.0
    return {n: s / top for n, s in scores.items()}


def _by_layer(names):
    layers: dict[str, list[str]] = {}
    for n in names:
        layers.setdefault(layer_of(n), []).append(n)
    return layers


def select(policy: Policy, scores: dict[str, float]) -> set[str]:
    """The tensors a two-level strategy sends to the target precision."""
    names = list(scores)
    s = policy.strategy
    if s == "uniform":
        return set(names)
    if s == "global":
        norm = _normalized(scores)
        return {n for n in names if norm[n] <= policy.threshold}
    if s == "groups":
        norm = _normalized(scores)
        group_of = {layer: g for g, layers in policy.groups.items() for layer in layers}
        # A layer in no group, or a group without a threshold, stays high.
        return {n for n in names if norm[n] <= policy.group_thresholds.get(group_of.get(layer_of(n)), -1.0)}
    if s == "layer-ratio":
        chosen = set()
        for members in _by_layer(names).values():
            ranked = sorted(members, key=lambda n: (scores[n], n))
            chosen.update(ranked[:math.floor(policy.p * len(ranked) + 1e-9)])
        return chosen
    if s == "layer-std":
        chosen = set()
        for members in _by_layer(names).values():
            logs = torch.tensor([math.log10(max(scores[n], 1e-30)) for n in members], dtype=torch.float64)
            bound = logs.mean() + policy.k * (logs.std() if len(members) > 1 else 0.0)
            chosen.update(n for n, v in zip(members, logs) if v < bound)
        return chosen
    raise ValueError(f"strategy {s!r} is not a two-level strategy")


def make_plan(policy: Policy, fisher: FisherMap, weights: dict[str, torch.Tensor]) -> Plan:
    """Policy + Fisher map (+ weights, for budget) -> Plan over every tensor in the map."""
    missing = [n for n in fisher.names if n not in weights]
    if missing:
        raise ValueError(f"the Fisher map names {len(missing)} tensors the model lacks (e.g. {missing[:3]}): "
                         "was it computed on another checkpoint?")
    shapes = {n: tuple(weights[n].shape) for n in fisher.names}
    scores = fisher.score(policy.statistic, policy.fisher_group)
    protected = {n for n in fisher.names if policy.protect_mid and layer_of(n) == "mid"}
    if policy.strategy in ("budget", "random"):
        budget = resolve_budget(policy, shapes)
        if policy.strategy == "random":
            prec = random_allocation(shapes, budget, policy.seed, protected, policy.lower_to)
        else:
            front = pareto_front(fisher, weights, policy.statistic, policy.fisher_group, protected)
            prec = pick_from_front(front, budget, shapes)
    else:
        prec = _two_level(fisher.names, shapes, select(policy, scores) - protected, policy)
    return Plan(prec, policy.to_dict())


# -- budget ------------------------------------------------------------------------------------

def floor_bytes(shapes: dict[str, tuple], protected: set[str] = frozenset()) -> int:
    """The smallest size any allocation reaches: int4 matrices, fp16 vectors, protected tensors fp32."""
    return sum(tensor_bytes(s, "fp32" if n in protected else fallback(s, "int4")) for n, s in shapes.items())


def resolve_budget(policy: Policy, shapes: dict[str, tuple]) -> int:
    total = sum(numel(s) for s in shapes.values())
    budget = policy.budget_bytes if policy.budget_bytes is not None else int(policy.avg_bits * total / 8)
    protected = {n for n in shapes if policy.protect_mid and layer_of(n) == "mid"}
    lo = floor_bytes(shapes, protected)
    if budget < lo:
        raise ValueError(f"budget {budget} bytes ({8 * budget / total:.2f} bits/weight) is below the floor of "
                         f"{lo} bytes ({8 * lo / total:.2f} bits/weight: INT4 matrices with fp32 scales, FP16 vectors)")
    return budget


@dataclass
class FrontPoint:
    bytes: int
    damage: float  # predicted loss increase, sum_k F_k ||Q(w_k) - w_k||^2
    precisions: dict[str, str]


def predicted_damage(w: torch.Tensor, precision: str, fisher_scalar: float, fisher_channel: torch.Tensor | None) -> float:
    """F * ||Q(w) - w||^2, per output channel when the channel Fisher is known."""
    err2 = (roundtrip(w, precision) - w.detach().float()).pow(2)
    if fisher_channel is not None and w.dim() >= 2:
        return float((fisher_channel.double() * err2.flatten(1).sum(1).double()).sum())
    return float(fisher_scalar * err2.sum())


def pareto_front(fisher: FisherMap, weights: dict[str, torch.Tensor], statistic: str = "mean",
                 group: str = "all", protected: set[str] = frozenset()) -> list[FrontPoint]:
    """Greedy multiple-choice knapsack over each tensor's lower convex hull of (bytes, damage).

    Starts from the smallest allocation and applies upgrades in order of damage removed per byte
    added: each prefix is a point of the front, so bytes rise and damage falls along it.
    """
    scores = fisher.score(statistic, group)
    state: dict[str, str] = {}
    upgrades = []  # (ratio, name, from, to, d_bytes, d_damage)
    for n in fisher.names:
        w = weights[n]
        shape = tuple(w.shape)
        if n in protected:
            state[n] = "fp32"
            continue
        options = sorted({fallback(shape, p) for p in BUDGET_CHOICES}, key=lambda p: tensor_bytes(shape, p))
        pts = [(tensor_bytes(shape, p), predicted_damage(w, p, scores[n], fisher.channel_score(n, statistic, group)), p)
               for p in options]
        hull = _lower_hull(pts)
        state[n] = hull[0][2]
        for a, b in zip(hull, hull[1:]):
            upgrades.append(((a[1] - b[1]) / (b[0] - a[0]), n, a[2], b[2], b[0] - a[0], a[1] - b[1]))
    # Later hull segments of one tensor have smaller ratios (convexity), so a global sort keeps order.
    upgrades.sort(key=lambda u: (-u[0], u[1]))
    shapes = {n: tuple(weights[n].shape) for n in fisher.names}
    size = plan_bytes(state, shapes)
    damage = sum(predicted_damage(weights[n], state[n], scores[n], fisher.channel_score(n, statistic, group))
                 for n in fisher.names)
    front = [FrontPoint(size, damage, dict(state))]
    for _, n, _, to, db, dd in upgrades:
        state[n] = to
        size += db
        damage -= dd
        front.append(FrontPoint(size, max(damage, 0.0), dict(state)))
    return front


def _lower_hull(pts):
    """Points (bytes, damage, label) sorted by bytes -> the convex lower hull with damage strictly falling."""
    hull = []
    for p in pts:
        if hull and p[1] >= hull[-1][1]:
            continue  # more bytes for no less damage: never worth it
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def pick_from_front(front: list[FrontPoint], budget: int, shapes) -> dict[str, str]:
    """The front point with least damage that fits the budget."""
    fitting = [p for p in front if p.bytes <= budget]
    if not fitting:
        raise ValueError(f"no allocation fits {budget} bytes (smallest is {front[0].bytes})")
    return dict(fitting[-1].precisions)


def random_allocation(shapes: dict[str, tuple], budget: int, seed: int, protected: set[str] = frozenset(),
                      lower_to: tuple[str, ...] = ("fp16", "int8", "int4")) -> dict[str, str]:
    """Lower tensors in a random order, each to a random precision from `lower_to`, until the size fits.

    The control for a two-level plan passes its one target, so only *which* tensors are lowered differs."""
    rng = random.Random(seed)
    prec = {n: "fp32" for n in shapes}
    order = [n for n in shapes if n not in protected]
    rng.shuffle(order)
    size = plan_bytes(prec, shapes)
    for n in order:
        if size <= budget:
            break
        choices = sorted({fallback(shapes[n], p) for p in lower_to}, key=lambda p: BITS[p])
        # A random lower precision; a later pass forces tensors to their floor if the budget is still exceeded.
        p = rng.choice(choices)
        size += tensor_bytes(shapes[n], p) - tensor_bytes(shapes[n], prec[n])
        prec[n] = p
    lowest = min(lower_to, key=lambda p: BITS[p])
    for n in order:  # still over budget: push tensors to the lowest allowed precision in the same random order
        if size <= budget:
            break
        p = fallback(shapes[n], lowest)
        size += tensor_bytes(shapes[n], p) - tensor_bytes(shapes[n], prec[n])
        prec[n] = p
    return prec
