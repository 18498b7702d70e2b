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


def _brute_force(options, budget):
    import itertools

    best = None
    names = list(options)
    for combo in itertools.product(*(options[n] for n in names)):
        size = sum(o[0] for o in combo)
        damage = sum(o[1] for o in combo)
        if size <= budget and (best is None or damage < best):
            best = damage
    return best


@pytest.mark.parametrize("seed", range(6))
def test_exact_budget_matches_brute_force_on_small_instances(seed):
    from lafq.policy import solve_budget

    g = torch.Generator().manual_seed(seed)
    options = {}
    for k in range(6):  # 6 tensors x 4 options: 4,096 allocations
        sizes = sorted(torch.randint(10, 500, (4,), generator=g).tolist())
        damages = sorted(torch.rand(4, generator=g, dtype=torch.float64).mul(10 ** (k - 3)).tolist(), reverse=True)
        options[f"t{k}"] = [(b, d, f"p{j}") for j, (b, d) in enumerate(zip(sizes, damages))]
    smallest = sum(o[0][0] for o in options.values())
    largest = sum(o[-1][0] for o in options.values())
    for budget in torch.linspace(smallest, largest, 9).long().tolist():
        best = solve_budget(options, budget)
        assert best.bytes <= budget
        assert best.damage == pytest.approx(_brute_force(options, budget), rel=1e-9, abs=1e-15)


def test_budget_plan_is_never_worse_than_the_greedy_front(setup):
    from lafq.policy import budget_options, solve_budget

    fm, m, w = setup
    total = sum(p.numel() for p in m.parameters())
    front = pareto_front(fm, w)
    options = budget_options(fm, w)
    for bits in (5, 6, 8):
        budget = int(bits * total / 8)
        greedy = [p for p in front if p.bytes <= budget][-1]
        assert solve_budget(options, budget).damage <= greedy.damage * (1 + 1e-9)


def test_first_last_keeps_stem_and_head_at_int8(setup):
    fm, _, w = setup
    plan = make_plan(Policy("first-last", target="int4", edge="int8"), fm, w)
    for n, p in plan.precisions.items():
        if w[n].dim() < 2:
            assert p == "fp16"
        else:
            assert p == ("int8" if layer_of(n) in ("stem", "head") else "int4"), n


def test_signals_change_the_budget_plan_but_not_its_size(setup):
    fm, m, w = setup
    shapes = param_shapes(m)
    budget = int(6 * sum(p.numel() for p in m.parameters()) / 8)
    plans = {s: make_plan(Policy("budget", budget_bytes=budget, signal=s, statistic="mean"), fm, w)
             for s in ("fisher", "error", "magnitude")}
    assert all(plan_bytes(p.precisions, shapes) <= budget for p in plans.values())
    assert plans["fisher"].precisions != plans["error"].precisions
    by_mag = make_plan(Policy("layer-ratio", p=0.5, signal="magnitude"), fm, w)
    mags = fm.magnitude_score()
    for layer in {layer_of(n) for n in mags}:
        members = sorted((n for n in mags if layer_of(n) == layer), key=lambda n: (mags[n], n))
        k = math.floor(0.5 * len(members))
        assert {n for n in members if by_mag.precisions[n] == "fp16"} == set(members[:k])
    with pytest.raises(ValueError, match="error"):
        Policy("layer-ratio", signal="error")


@pytest.mark.parametrize("seed", range(5))
def test_random_controls_are_built_up_to_within_one_percent_of_the_budget(setup, seed):
    fm, m, w = setup
    shapes = param_shapes(m)
    total = sum(p.numel() for p in m.parameters())
    seen = set()
    for bits in (5.0, 6.0, 8.0):
        budget = int(bits * total / 8)
        plan = make_plan(Policy("random", budget_bytes=budget, seed=seed, lower_to=("fp16", "int8", "int4")), fm, w)
        size = plan_bytes(plan.precisions, shapes)
        assert 0.99 * budget <= size <= budget
        seen.add(tuple(sorted(plan.precisions.items())))
    assert len(seen) == 3


def test_random_controls_differ_between_seeds_at_equal_size(setup):
    fm, m, w = setup
    budget = int(6 * sum(p.numel() for p in m.parameters()) / 8)
    plans = [make_plan(Policy("random", budget_bytes=budget, seed=k), fm, w).precisions for k in range(5)]
    assert len({tuple(sorted(p.items())) for p in plans}) == 5


def test_group_wise_int4_is_a_budget_choice(setup):
    fm, m, w = setup
    total = sum(p.numel() for p in m.parameters())
    plans = [make_plan(Policy("budget", avg_bits=b, statistic="mean"), fm, w) for b in (5, 6, 8)]
    used = set().union(*(p.precisions.values() for p in plans))
    assert used & {"int4-g32", "int4-g64"}
    only = make_plan(Policy("budget", avg_bits=6, statistic="mean", choices=("fp32", "fp16", "int8", "int4")), fm, w)
    assert not set(only.precisions.values()) & {"int4-g32", "int4-g64"}
    assert total > 0


def _adapted(kind):
    """(denoiser, images) for the project U-Net, a diffusers UNet2DModel and a DiT, through their adapters."""
    from lafq.models import from_diffusers, from_lafq_unet
    from tests.diffusers_tiny import scheduler, tiny_dit, tiny_unet2d

    torch.manual_seed(0)
    if kind == "lafq-UNet":
        den = from_lafq_unet(UNet(TINY).eval())
    else:
        den = from_diffusers((tiny_unet2d() if kind == "UNet2DModel" else tiny_dit()).eval(), scheduler())
        if kind == "DiT":
            from lafq.models import Conditioning
            den = den.with_conditioning(Conditioning({"class_labels": torch.tensor([0, 1])}, 2))
        else:
            from lafq.models import with_class_conditioning
            den = with_class_conditioning(den, 2)
    images = torch.rand(6, *den.sample_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return den, images


@pytest.mark.parametrize("kind, edges, mid", [("lafq-UNet", ("stem", "head"), "mid."),
                                              ("UNet2DModel", ("conv_in", "conv_out"), "mid_block."),
                                              ("DiT", ("pos_embed.proj", "proj_out_2"), None)])
def test_every_strategy_plans_every_model_by_its_own_layers(kind, edges, mid):
    """first-last keeps the model's own first and last layers at the edge precision (it used to send a diffusers
    model to uniform INT4: its edges were looked up as `stem` and `head`), groups lowers by the model's own
    encoder / mid / decoder (it gave a 100% FP32 plan), protect-the-middle keeps the model's middle block."""
    from lafq.fisher import fisher_map
    from lafq.layers import layers_of

    den, images = _adapted(kind)
    fm = fisher_map(den, images, bins=2, samples_per_bin=2)
    w = dict(den.module.named_parameters())
    layers = layers_of(param_shapes(den.module))
    assert layers.edges == edges and set(layers.order) == {layers.layer(n) for n in w}
    plan = make_plan(Policy("first-last", target="int4", edge="int8"), fm, w).precisions
    for n, p in plan.items():
        edge = layers.layer(n) in edges
        assert p == (("int8" if edge else "int4") if w[n].dim() > 1 else "fp16"), n
    assert sum(layers.layer(n) in edges for n in plan) >= 2
    grouped = make_plan(Policy("groups", target="fp16", group_thresholds={"encoder": 1.0, "mid": 0.0, "decoder": 0.0}),
                        fm, w).precisions
    encoder = set(layers.groups["encoder"])
    assert {n for n, p in grouped.items() if p == "fp16"} == {n for n in w if layers.layer(n) in encoder} != set()
    for strategy in ("uniform", "global", "layer-ratio", "layer-std", "budget", "random"):
        protected = make_plan(Policy(strategy, target="int4", avg_bits=20.0, protect_mid=True), fm, w).precisions
        kept = layers.in_group("mid")
        assert kept and all(protected[n] == "fp32" for n in kept), strategy
        if mid is not None:
            assert all(n.startswith(mid) for n in kept)


def test_a_pinned_layer_holds_its_precision_inside_the_exact_budget_and_counts_its_bytes(tiny_model):
    from lafq.data import load_dataset
    from lafq.fisher import compute_fisher
    from lafq.policy import floor_bytes, plan_bytes

    x, y = load_dataset("mnist-train5k").tensors()
    fm = compute_fisher(tiny_model, x[::50], y[::50], bins=2, samples_per_bin=2, method="naive")
    w = dict(tiny_model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in w.items()}
    budget = int(1.05 * floor_bytes(shapes)) + 4 * sum(p.numel() for n, p in w.items() if n.startswith("head."))
    for signal in ("error", "fisher"):
        free = make_plan(Policy("budget", budget_bytes=budget, signal=signal, statistic="mean"), fm, w)
        pinned = make_plan(Policy("budget", budget_bytes=budget, signal=signal, statistic="mean",
                                  pinned={"head": "fp16"}), fm, w)
        assert all(p == "fp16" for n, p in pinned.precisions.items() if n.startswith("head."))
        assert plan_bytes(pinned.precisions, shapes) <= budget and free.precisions != pinned.precisions
    with pytest.raises(ValueError, match="pinned layer 'nohead' is not a layer or tensor of this model"):
        make_plan(Policy("budget", budget_bytes=budget, pinned={"nohead": "fp16"}), fm, w)
    with pytest.raises(ValueError, match="unknown precision"):
        Policy("budget", budget_bytes=budget, pinned={"head": "fp12"})
