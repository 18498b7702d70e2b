"""Does a predictor rank tensors by the damage they really do? Sensitivity validation.

For each unit (one weight matrix, or one layer's matrices) the plan lowers that unit alone to a
precision (INT4 by default) and keeps everything else FP32; the measured damage is the paired
fidelity loss to FP32 from the same noise (mean |Δ| per pixel, and the classifier-feature distance),
averaged over seeds. Each predictor gives one number per unit:

    fisher           Fisher score (mean over timesteps of the per-element mean squared gradient),
                     the number the source's two-level strategies rank by
    fisher_x_error   sum over channels of F_c * ||Q(w)_c - w_c||^2: the budget policy's predicted damage
    error            ||Q(w) - w||^2 alone (no Fisher)
    magnitude        mean |w| (the source's alternative signal)
    random           uniform noise: what "no information" scores (mean ρ over RANDOM_DRAWS draws)

The agreement is Spearman's rank correlation ρ (scipy.stats.spearmanr) with its two-sided p-value.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .layers import layers_of
from .pipeline import SampleSpec
from .policy import Plan, predicted_damage
from .precision import fallback, roundtrip

PREDICTORS = ("fisher", "fisher_x_error", "error", "magnitude", "random")
MEASURES = ("mad", "feature_distance")
RANDOM_DRAWS = 100


@dataclass(frozen=True)
class SensitivitySettings:
    # Fidelity from the same noise resolves single-tensor damage at small N (per-seed spread well under
    # the spread between tensors): 43 tensors x 3 seeds x 64 images at DDIM-20 took 59 min on 2 cores shared with other jobs.
    n: int = 64
    steps: int = 20
    seeds: int = 3
    precision: str = "int4"
    unit: str = "tensor"  # or "layer"
    statistic: str = "mean"
    # Further precisions each unit is lowered to alone, after `precision`: the formats a budget plan actually puts
    # tensors at (INT8, INT4-g32, FP16, ...), so the predictor is checked where plans use it, not only at INT4.
    also: tuple[str, ...] = ()

    def __post_init__(self):
        from .precision import check_precision

        if self.unit not in ("tensor", "layer"):
            raise ValueError(f"unit must be 'tensor' or 'layer', got {self.unit!r}")
        object.__setattr__(self, "also", tuple(p for p in dict.fromkeys(self.also) if p != self.precision))
        for p in (self.precision, *self.also):
            check_precision(p)

    @property
    def precisions(self) -> tuple[str, ...]:
        return (self.precision, *self.also)


def units(names_shapes: dict[str, tuple], unit: str) -> dict[str, list[str]]:
    """Unit name -> the matrices (tensors with an output-channel axis) it lowers."""
    mats = [n for n, s in names_shapes.items() if len(s) >= 2]
    if unit == "tensor":
        return {n: [n] for n in mats}
    layers = layers_of(names_shapes)
    out: dict[str, list[str]] = {}
    for n in mats:
        out.setdefault(layers.layer(n), []).append(n)
    return out


def unit_plan(shapes: dict[str, tuple], members: list[str], precision: str) -> Plan:
    return Plan({n: fallback(shapes[n], precision) if n in members else "fp32" for n in shapes},
                {"strategy": "sensitivity", "lowered": members, "target": precision})


def predictors(fisher, weights: dict[str, torch.Tensor], groups: dict[str, list[str]], precision: str = "int4",
               statistic: str = "mean") -> dict[str, dict[str, float]]:
    """predictor -> unit -> value (units of several tensors: sums, Fisher weighted by element count)."""
    scores = fisher.score(statistic)
    mags = fisher.magnitude_score()
    numel = dict(zip(fisher.names, fisher.numels))
    out = {p: {} for p in PREDICTORS if p != "random"}
    for u, members in groups.items():
        tot = sum(numel[n] for n in members)
        out["fisher"][u] = sum(scores[n] * numel[n] for n in members) / tot
        out["magnitude"][u] = sum(mags[n] * numel[n] for n in members) / tot
        out["error"][u] = sum(float((roundtrip(weights[n], precision) - weights[n].detach().float()).pow(2).sum())
                              for n in members)
        out["fisher_x_error"][u] = sum(predicted_damage(weights[n], precision, scores[n],
                                                        fisher.channel_score(n, statistic)) for n in members)
    return out


def spearman(measured: dict[str, float], predicted: dict[str, float]) -> tuple[float, float]:
    from scipy.stats import spearmanr

    keys = sorted(measured)
    r = spearmanr([measured[k] for k in keys], [predicted[k] for k in keys])
    return float(r.statistic), float(r.pvalue)


def random_rho(measured: dict[str, float], draws: int = RANDOM_DRAWS, seed: int = 0) -> tuple[float, float, float]:
    """Mean, 2.5th and 97.5th percentile of ρ for random predictors: the no-information band."""
    rng = random.Random(seed)
    rhos = sorted(spearman(measured, {k: rng.random() for k in measured})[0] for _ in range(draws))
    return sum(rhos) / draws, rhos[int(0.025 * draws)], rhos[min(draws - 1, int(0.975 * draws))]


def run(evaluator, fisher, s: SensitivitySettings, guidance: float, log=print) -> list[dict]:
    """One record per (unit, seed): the paired fidelity of the unit lowered alone, with its predictors."""
    model = evaluator.den.module
    weights = {n: p.detach().cpu() for n, p in model.named_parameters()}  # beside the Fisher map, on any device
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    groups = units(shapes, s.unit)
    records = []
    for precision in s.precisions:
        preds = predictors(fisher, weights, groups, precision, s.statistic)
        for i, (u, members) in enumerate(groups.items()):
            plan = unit_plan(shapes, members, precision)
            if all(plan.precisions[n] == "fp32" for n in members):
                continue  # e.g. FP32 asked for: nothing lowered
            for seed in range(s.seeds):
                spec = SampleSpec(n=s.n, steps=s.steps, guidance=guidance, seed=seed, batch_size=128)
                rec = evaluator.record(u, plan, spec)
                if rec is None:  # cached_only and not measured yet
                    continue
                rec.update(unit=u, unit_kind=s.unit, precision=precision,
                           **{f"pred_{p}": preds[p][u] for p in preds})
                records.append(rec)
            done = [r for r in records if r["unit"] == u and r["precision"] == precision]
            if done:
                log(f"sensitivity {precision} {i + 1}/{len(groups)} {u}: mean |Δ| "
                    f"{sum(r['mad'] for r in done) / len(done):.5f}")
    return records


def by_precision(records: list[dict]) -> dict[str, dict]:
    """summarize() for each precision the records lowered units to, in first-seen order (records without a
    precision field count as INT4, the stage's first format)."""
    seen = list(dict.fromkeys(r.get("precision") or "int4" for r in records))
    return {p: summarize(records, p) for p in seen}


def summarize(records: list[dict], precision: str | None = None) -> dict:
    """Per measure: per-unit mean over seeds, and ρ (p) of every predictor against it, over the records of one
    precision (default: the first the records name, INT4 in every stage lafq runs)."""
    if precision is None and records:
        precision = records[0].get("precision") or "int4"
    records = [r for r in records if (r.get("precision") or "int4") == precision]
    by_unit: dict[str, list[dict]] = {}
    for r in records:
        by_unit.setdefault(r["unit"], []).append(r)
    if len(by_unit) < 3:
        return {}  # too few units for a rank correlation
    out = {"units": len(by_unit), "seeds": len(next(iter(by_unit.values()))) if by_unit else 0, "measures": {},
           "predicted": {p: {u: rs[0][f"pred_{p}"] for u, rs in by_unit.items()} for p in PREDICTORS if p != "random"}}
    for m in MEASURES:
        if any(r.get(m) is None for rs in by_unit.values() for r in rs):
            continue  # a model with no classifier has no feature distance: mean |Δ| only
        measured = {u: sum(r[m] for r in rs) / len(rs) for u, rs in by_unit.items()}
        rho = {p: spearman(measured, out["predicted"][p]) for p in PREDICTORS if p != "random"}
        out["measures"][m] = {"measured": measured, "rho": rho, "random": random_rho(measured)}
    return out
