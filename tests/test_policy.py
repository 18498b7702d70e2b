import math

import pytest
import torch

from lafq.fisher import FisherMap
from lafq.model import UNet, layer_of
from lafq.policy import (Plan, Policy, floor_bytes, make_plan, pareto_front, param_shapes, plan_bytes)
from tests.conftest import TINY


@pytest.fixture(scope="module")
def setup():
    """A tiny model with a synthetic Fisher map whose scores we control."""
    torch.manual_seed(0)
    m = UNet(TINY).eval()
    names = [k for k, _ in m.named_parameters()]
    g = torch.Generator().manual_seed(0)
    fisher = torch.rand(1, len(names), 3, generator=g, dtype=torch.float64) ** 4 + 1e-9
    channel = {k: torch.rand(1, 3, p.shape[0], generator=g, dtype=torch.float64) for k, p in m.named_parameters() if p.dim() > 1}
    fm = FisherMap(names, [p.numel() for p in m.parameters()], [0, 300, 600, 1000], ["all"], fisher,
                   torch.ones(len(names), dtype=torch.float64), channel)
    return fm, m, dict(m.named_parameters())


def test_global_threshold_quantizes_exactly_the_tensors_below_it(setup):
    fm, _, w = setup
    scores = fm.score("final")
    top = max(scores.values())
    for tau in (0.0, 0.05, 0.3, 1.0):
        plan = make_plan(Policy("global", threshold=tau), fm, w)
        low = {n for n, p in plan.precisions.items() if p != "fp32"}
        assert low == {n for n, s in scores.items() if s / top <= tau}
    assert len(low) == len(scores)  # tau = 1 takes everything


def test_layer_ratio_edges_and_the_lowest_per_layer(setup):
    fm, _, w = setup
    none = make_plan(Policy("layer-ratio", p=0.0), fm, w)
    everything = make_plan(Policy("layer-ratio", p=1.0), fm, w)
    assert set(none.precisions.values()) == {"fp32"} and set(everything.precisions.values()) == {"fp16"}
    plan = make_plan(Policy("layer-ratio", p=0.25, statistic="mean"), fm, w)
    scores = fm.score("mean")
    for layer in {layer_of(n) for n in scores}:
        members = sorted((n for n in scores if layer_of(n) == layer), key=scores.get)
        k = math.floor(0.25 * len(members))
        assert {n for n in members if plan.precisions[n] == "fp16"} == set(members[:k])


def test_groups_follow_their_thresholds(setup):
    fm, _, w = setup
    plan = make_plan(Policy("groups", group_thresholds={"encoder": 0.0, "mid": 1.0, "decoder": 1.0}), fm, w)
    for n, p in plan.precisions.items():
        assert p == ("fp32" if layer_of(n) in ("embed", "stem", "down1", "down2", "down3") else "fp16")


def test_layer_std_is_monotone_in_k_and_protect_mid_holds(setup):
    fm, _, w = setup
    counts = [sum(p == "int8" for p in make_plan(Policy("layer-std", k=k, target="int8"), fm, w).precisions.values())
              for k in (-2, -0.5, 0, 0.5, 2)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    plan = make_plan(Policy("uniform", target="int4", protect_mid=True), fm, w)
    for n, p in plan.precisions.items():
        want = "fp32" if layer_of(n) == "mid" else ("int4" if w[n].dim() > 1 else "fp16")
        assert p == want, n


def test_budget_never_exceeds_and_front_is_monotone(setup):
    fm, m, w = setup
    shapes = param_shapes(m)
    front = pareto_front(fm, w)
    assert front[0].bytes == floor_bytes(shapes)
    assert all(a.bytes < b.bytes and a.damage >= b.damage for a, b in zip(front, front[1:]))
    # The front ends where nothing is lost; FP16-exact tensors (e.g. GroupNorm ones) need no FP32 to get there.
    assert front[-1].damage == pytest.approx(0, abs=1e-12) and front[-1].bytes <= 4 * sum(p.numel() for p in m.parameters())
    for bits in (5, 6, 8, 16):  # this tiny model's floor is 4.88 bits (many vectors)
        plan = make_plan(Policy("budget", avg_bits=bits), fm, w)
        budget = int(bits * sum(p.numel() for p in m.parameters()) / 8)
        assert plan_bytes(plan.precisions, shapes) <= budget
        rnd = make_plan(Policy("random", avg_bits=bits, seed=1), fm, w)
        assert plan_bytes(rnd.precisions, shapes) <= budget


def test_budget_beats_random_on_predicted_damage(setup):
    from lafq.policy import predicted_damage
    fm, _, w = setup
    scores = fm.score("mean")

    def damage(plan):
        return sum(predicted_damage(w[n], p, scores[n], fm.channel_score(n, "mean")) for n, p in plan.precisions.items())
    b = make_plan(Policy("budget", avg_bits=6, statistic="mean"), fm, w)
    r = make_plan(Policy("random", avg_bits=6, statistic="mean"), fm, w)
    assert damage(b) < damage(r)


@pytest.mark.parametrize("kw, message", [
    (dict(strategy="layer-ratio", p=1.5), r"p must be in \[0, 1\]"),
    (dict(strategy="layer-ratio", p=float("nan")), "finite"),
    (dict(strategy="magic"), "unknown strategy"),
    (dict(strategy="global", threshold=-1), "threshold"),
    (dict(strategy="budget"), "needs avg_bits"),
    (dict(target="int3"), "unknown precision"),
    (dict(strategy="groups", group_thresholds={"nope": 0.5}), "unknown groups"),
])
def test_bad_policies_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        Policy(**kw)


def test_budget_below_the_int4_floor_is_refused(setup):
    fm, _, w = setup
    with pytest.raises(ValueError, match="below the floor"):
        make_plan(Policy("budget", avg_bits=2.0), fm, w)


def test_plan_json_round_trip_and_unknown_parameters(setup):
    fm, m, w = setup
    plan = make_plan(Policy("uniform", target="int8"), fm, w)
    back = Plan.from_json(plan.to_json())
    assert back.precisions == plan.precisions and back.policy["strategy"] == "uniform"
    bad = Plan({**plan.precisions, "down9.weight": "fp16"})
    with pytest.raises(ValueError, match="lacks"):
        bad.validate(param_shapes(m))
    with pytest.raises(ValueError, match="not a LAFQ plan"):
        Plan.from_json("[1, 2]")


def test_random_control_can_be_restricted_to_a_plans_precisions(tiny_model):
    from lafq.policy import param_shapes, random_allocation, plan_bytes

    shapes = param_shapes(tiny_model)
    fp32 = plan_bytes({n: "fp32" for n in shapes}, shapes)
    prec = random_allocation(shapes, int(0.7 * fp32), seed=3, lower_to=("fp16",))
    assert set(prec.values()) <= {"fp32", "fp16"} and plan_bytes(prec, shapes) <= 0.7 * fp32
    prec = random_allocation(shapes, int(0.3 * fp32), seed=3, lower_to=("int8",))
    assert {p for n, p in prec.items() if len(shapes[n]) > 1} <= {"fp32", "int8"}  # vectors may fall back to fp16
    with pytest.raises(ValueError, match="lower_to"):
        Policy("random", avg_bits=8, lower_to=())
