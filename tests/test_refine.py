"""The measured refinement of the exact budget plan: within the budget by construction, never worse on its own
calibration measure than the plan it starts from, and it says what it cost."""
import pytest
import torch

from lafq.policy import Plan, Policy, make_plan, param_shapes
from lafq.quantize import size_report
from lafq.refine import RefineSettings, candidate_tensors, refine_budget


@pytest.fixture
def den_and_fisher(tiny_model):
    from lafq.fisher import fisher_map
    from lafq.models import from_lafq_unet

    den = from_lafq_unet(tiny_model)
    x = torch.rand(12, 1, 28, 28) * 2 - 1
    fm = fisher_map(den, x, labels=torch.arange(12) % 10, bins=2, samples_per_bin=3)
    return den, fm


def test_the_refined_plan_stays_in_budget_never_measures_worse_and_reloads_from_its_file(den_and_fisher, tmp_path):
    den, fm = den_and_fisher
    shapes = param_shapes(den.module)
    weights = dict(den.module.named_parameters())
    budget = size_report(make_plan(Policy(strategy="budget", avg_bits=5.0, statistic="mean"), fm, weights),
                         shapes).total_bytes
    s = RefineSettings(n=4, steps=2, candidates=3, max_evals=5)
    lines = []
    plan, cost = refine_budget(den, fm, budget, s, log=lines.append)
    assert size_report(plan, shapes).total_bytes <= budget
    assert 1 <= cost["evaluations"] <= 5 and cost["seconds"] >= 0 and len(lines) == cost["evaluations"] - 1
    mads = [step["mad"] for step in cost["steps"]]
    assert mads == sorted(mads, reverse=True)  # each accepted step measured lower than the one before
    assert (plan.policy["pinned"] or {}) == cost["steps"][-1]["pinned"]
    for name, p in cost["steps"][-1]["pinned"].items():  # pinned tensors hold the precision they were raised to
        assert plan.precisions[name] == p
    # Its policy re-plans it exactly, and it survives a quantized file's round trip (the policy is validated there).
    assert make_plan(Policy(**plan.policy), fm, weights).precisions == plan.precisions
    import copy

    from lafq.quantize import load_quantized, quantize, save_quantized
    save_quantized(tmp_path / "q.safetensors", quantize(copy.deepcopy(den.module), plan))
    assert load_quantized(tmp_path / "q.safetensors")[0].lafq_plan.precisions == plan.precisions
    stem = max((n for n in shapes if n.startswith("stem") and len(shapes[n]) >= 2), key=lambda n: torch.Size(shapes[n]).numel())
    assert stem in candidate_tensors(den, fm, 2)  # the first and last layers are always tried


def test_a_tensor_can_be_pinned_by_name_in_a_budget_plan(den_and_fisher):
    den, fm = den_and_fisher
    weights = dict(den.module.named_parameters())
    name = next(n for n, w in weights.items() if w.dim() >= 2 and n.startswith("head"))
    plan = make_plan(Policy(strategy="budget", avg_bits=5.0, statistic="mean", pinned={name: "fp16"}), fm, weights)
    assert plan.precisions[name] == "fp16"
    with pytest.raises(ValueError, match="not a layer or tensor of this model"):
        make_plan(Policy(strategy="budget", avg_bits=5.0, pinned={"nope.weight": "fp16"}), fm, weights)
    assert isinstance(plan, Plan)


def test_quantize_refine_from_the_command_line_writes_a_plan_that_reloads(tiny_ckpt, tmp_path, capsys):
    import json

    from lafq.cli import main
    from lafq.planfile import read_plan

    assert main(["fisher", "--checkpoint", str(tiny_ckpt), "--dataset", "mnist-train5k", "--bins", "2", "--samples",
                 "3", "--device", "cpu", "--out", str(tmp_path / "f.safetensors"), "--json"]) == 0
    capsys.readouterr()
    assert main(["quantize", "--model", str(tiny_ckpt), "--fisher", str(tmp_path / "f.safetensors"), "--avg-bits",
                 "6", "--statistic", "mean", "--refine", "3", "--plan-out", str(tmp_path / "p.json"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 1 <= res["refine"]["evaluations"] <= 3 and res["size"]["avg_bits"] <= 6.0
    assert read_plan((tmp_path / "p.json").read_bytes(), "p.json").precisions
    assert main(["quantize", "--model", str(tiny_ckpt), "--fisher", str(tmp_path / "f.safetensors"), "--strategy",
                 "layer-ratio", "--refine"]) == 2
    assert "--refine refines a Fisher budget plan" in capsys.readouterr().err
