"""The budget plan is the exact optimum of its objective on the shipped model (not a greedy approximation)."""
import numpy as np
import pytest

from lafq.fisher import FisherMap
from lafq.pipeline import load_denoiser
from lafq.policy import budget_options, pareto_front, param_shapes, predicted_damage
from lafq.report import RECIPES, Settings, grid


def dp_optimum(options, budgets):
    """Least total damage within each budget by dynamic programming over extra bytes: exact, independent of the MILP."""
    base_bytes = sum(o[0][0] for o in options.values())
    cap = max(budgets) - base_bytes
    dp = np.zeros(cap + 1)  # dp[c]: least damage of the tensors so far using at most c extra bytes
    for opts in options.values():
        b0 = opts[0][0]
        new = np.full(cap + 1, np.inf)
        for b, d, _ in opts:
            e = b - b0
            if e <= cap:
                np.minimum(new[e:], dp[:cap + 1 - e] + d, out=new[e:])
        dp = new
    return {b: float(dp[b - base_bytes]) for b in budgets}


@pytest.fixture(scope="module")
def shipped():
    model, _ = load_denoiser()
    return model, FisherMap.load("checkpoints/fisher.safetensors")


def test_budget_plans_of_the_report_are_exactly_optimal_on_the_shipped_model(shipped):
    model, fm = shipped
    w = dict(model.named_parameters())
    shapes = param_shapes(model)
    total = sum(p.numel() for p in model.parameters())
    # Every Fisher budget row of the report: the 8 ... 4.25-bit sweep and the baselines' own sizes.
    rows = [r for r in grid(model, fm, Settings()) if r.kind == "budget"]
    budgets = {r.name: r.plan.policy["budget_bytes"] or int(r.plan.policy["avg_bits"] * total / 8) for r in rows}
    assert len(budgets) == len(Settings().budgets) + 2 + len(RECIPES)  # the sweep, INT4+INT8 edges, g32, recipes
    options = budget_options(fm, w, "mean")
    best = dp_optimum(options, sorted(set(budgets.values())))
    scores = fm.score("mean")
    front = pareto_front(fm, w, "mean")
    for row in rows:
        bits, budget, plan = row.name, budgets[row.name], row.plan
        damage = sum(predicted_damage(w[n], p, scores[n], fm.channel_score(n, "mean")) for n, p in plan.precisions.items())
        assert damage == pytest.approx(best[budget], rel=1e-9), bits
        assert sum(1 for _ in shapes) == len(plan.precisions)
        greedy = [p for p in front if p.bytes <= budget][-1]
        assert greedy.damage >= damage * (1 - 1e-9)  # the old greedy pick can only be worse


def test_the_budget_solver_never_turns_warnings_into_errors_for_other_threads(monkeypatch):
    """scipy's LinearConstraint sets the process-wide warnings filter to "error" while it converts a dense
    matrix; in the app that made another user's FID (whose sqrtm warns) fail at that moment. The solver
    passes sparse matrices, which skip that block."""
    import scipy.optimize._constraints as constraints

    from lafq.policy import solve_budget

    calls = []
    monkeypatch.setattr(constraints, "simplefilter", lambda *a, **k: calls.append(a))
    options = {"a": [(1, 2.0, "int4"), (4, 0.0, "fp32")], "b": [(1, 1.0, "int4"), (4, 0.5, "fp32")]}
    assert solve_budget(options, 5).precisions == {"a": "fp32", "b": "int4"}
    assert calls == []
