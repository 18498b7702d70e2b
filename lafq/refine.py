"""A measured refinement of the exact budget plan: the additive objective Σ F·‖Q(w) − w‖² ranks single tensors well
but misprices some in combination (damage is not additive: on the MNIST U-Net the 4.5-bit plan puts the head at
INT8 and measures worse than the 4.25-bit plan). The refinement keeps the budget and lets measurement decide where
the objective is unsure:

    plan_0 = the exact budget plan (lafq.policy, MILP)
    repeat: for each candidate tensor (the `candidates` with the highest Fisher score, and the largest matrix of the
            model's first and last layers) not yet pinned, pin it one precision higher than the current plan gives
            it and re-solve the exact budget for everything else at the same bytes; measure each such plan's damage
            (mean |Δ| to FP32's images from the same noise, on a calibration batch: its own seed, not the
            evaluation's); keep the best if it beats the current plan, else stop.

Cost: at most `max_evals` calibration samplings (each one quantized model sampling `n` images for `steps` DDIM
steps) plus one FP32 sampling; the result records its evaluations, seconds and every step's measured damage.
The plan stays within the budget by construction (each candidate is an exact budget solve with pins).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace

import torch

from .fisher import FisherMap
from .policy import BUDGET_CHOICES, Plan, Policy, make_plan
from .precision import fallback, tensor_bytes


@dataclass(frozen=True)
class RefineSettings:
    n: int = 64  # calibration images per evaluation
    steps: int = 10  # DDIM steps of the calibration sampling
    guidance: float = 1.5
    seed: int = 1000  # the calibration noise: away from the report's evaluation seeds (0, 1, 2, ...)
    candidates: int = 8  # tensors tried per round (highest Fisher score), besides the first and last layers'
    max_evals: int = 24  # quantized samplings at most (the base plan's included)

    def __post_init__(self):
        if self.n < 1 or self.steps < 1 or self.candidates < 0 or self.max_evals < 1:
            raise ValueError("n, steps and max_evals must be at least 1, candidates at least 0")


def _up(shape, current: str, choices) -> str | None:
    """The next precision above `current` by stored bytes among `choices` (None at the top)."""
    opts = sorted({fallback(shape, p) for p in choices}, key=lambda p: tensor_bytes(shape, p))
    above = [p for p in opts if tensor_bytes(shape, p) > tensor_bytes(shape, current)]
    return above[0] if above else None


def candidate_tensors(den, fisher: FisherMap, k: int, statistic: str = "mean") -> list[str]:
    """The weight matrices (2+ dims) with the k highest Fisher scores, then the largest matrix of the first and
    last layers (what practitioners protect), without repeats."""
    from .layers import layers_of

    shapes = {n: tuple(p.shape) for n, p in den.module.named_parameters() if n in set(fisher.names)}
    scores = fisher.score(statistic)
    mats = [n for n in shapes if len(shapes[n]) >= 2]
    top = sorted(mats, key=lambda n: -scores[n])[:k]
    layers = layers_of(shapes)
    edges = []
    for edge in layers.edges:
        members = [n for n in mats if layers.layer(n) == edge]
        if members:
            edges.append(max(members, key=lambda n: torch.Size(shapes[n]).numel()))
    return list(dict.fromkeys([*top, *edges]))


def refine_budget(den, fisher: FisherMap, budget_bytes: int, s: RefineSettings = RefineSettings(), *,
                  statistic: str = "mean", choices=BUDGET_CHOICES, log=print) -> tuple[Plan, dict]:
    """The refined plan (its policy: the exact budget with the accepted pins, so re-planning it gives the same
    plan) and what it cost: evaluations, seconds, the measured damage of the base plan and of every accepted step."""
    from .pipeline import SampleSpec, generate

    t0 = time.perf_counter()
    weights = dict(den.module.named_parameters())
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    base = Policy(strategy="budget", budget_bytes=budget_bytes, statistic=statistic, choices=tuple(choices))
    spec = SampleSpec(n=s.n, steps=s.steps, guidance=s.guidance, seed=s.seed, batch_size=min(s.n, 128))
    reference = generate(den, spec)[0].float()
    cpu_model = copy.deepcopy(den.module).cpu()

    def damage(plan: Plan) -> float:
        from .quantize import quantize

        q = quantize(copy.deepcopy(cpu_model), plan).to(next(den.module.parameters()).device)
        return float((generate(replace(den, module=q), spec)[0].float() - reference).abs().mean() / 255)

    plan = make_plan(base, fisher, weights)
    best, evals, pins = damage(plan), 1, {}
    steps = [{"pinned": {}, "mad": best}]
    tried: set[tuple] = set()
    cands = candidate_tensors(den, fisher, s.candidates, statistic)
    while evals < s.max_evals:
        round_best = None
        for name in cands:
            if name in pins or evals >= s.max_evals:
                continue
            up = _up(shapes[name], plan.precisions[name], choices)
            if up is None:
                continue
            trial_pins = {**pins, name: up}
            key = tuple(sorted(trial_pins.items()))
            if key in tried:
                continue
            tried.add(key)
            try:
                trial = make_plan(replace(base, pinned=trial_pins), fisher, weights)
            except ValueError:  # the pins alone pass the budget
                continue
            if trial.precisions == plan.precisions:
                continue
            d = damage(trial)
            evals += 1
            log(f"refine: {name} -> {up}: mean |Δ| {1000 * d:.2f} ‰ (current {1000 * best:.2f} ‰)")
            if d < best and (round_best is None or d < round_best[0]):
                round_best = (d, trial, trial_pins)
        if round_best is None:
            break
        best, plan, pins = round_best
        steps.append({"pinned": dict(pins), "mad": best})
    cost = {"evaluations": evals, "seconds": round(time.perf_counter() - t0, 1), "steps": steps,
            "calibration": asdict(s), "candidates": cands}
    # The policy of a refined plan is the exact budget with the accepted pins (a valid Policy: the plan file and a
    # quantized model's metadata reload it); how it was found is in `cost`.
    plan = Plan(plan.precisions, replace(base, pinned=pins or None).to_dict())
    return plan, cost
