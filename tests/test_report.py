import re
from dataclasses import replace

import pytest

from lafq.data import load_dataset
from lafq.evaluate import Evaluator
from lafq.fisher import compute_fisher
from lafq.metrics import ClassifierBackend, mean_ci95
from lafq.policy import param_shapes
from lafq.quantize import size_report
from lafq.report import EDGE, G32, PINNED_ERROR, RECIPES, Settings, compare, evaluate, grid, read_csv, summarize, verdict, write
from lafq.sensitivity import SensitivitySettings, run as run_sensitivity, spearman, summarize as sens_summary

SMALL = Settings(n=10, steps=2, seeds=3, guidance=3.0, random_seeds=2, budgets=(8.0,),
                 sensitivity=SensitivitySettings(n=4, steps=2, seeds=2, unit="layer"))


@pytest.fixture(scope="module")
def tiny_fisher():
    import torch

    from lafq.model import UNet
    from tests.conftest import TINY
    torch.manual_seed(0)
    m = UNet(TINY).eval()
    x, y = load_dataset("mnist-train5k").tensors()
    return m, compute_fisher(m, x[::25], y[::25], bins=2, samples_per_bin=2)


def test_grid_holds_the_baselines_exact_budgets_and_equal_size_controls(tiny_fisher):
    m, fm = tiny_fisher
    rows = {r.name: r for r in grid(m, fm, SMALL)}
    shapes = param_shapes(m)
    size = {n: size_report(r.plan, shapes).total_bytes for n, r in rows.items()}
    assert list(rows)[0] == "fp32"
    for name in ("uniform int4", EDGE, G32, "uniform int4-g64", "uniform fp16", "global fp16", "groups fp16",
                 "layer-ratio fp16", "layer-std fp16", "budget 8 bits", "error-only budget @ int4-g32 size",
                 "magnitude budget @ int4-g32 size"):
        assert name in rows, name
    # Plans compared with each other are equal in size: the budget is solved at the baseline's own size.
    assert size["budget @ int4-g32 size"] <= size[G32] and size[f"budget @ {EDGE} size"] <= size[EDGE]
    # The error-only budget with the last layer pinned at FP16, at the INT4-g32 size.
    pinned = rows[PINNED_ERROR].plan.precisions
    assert pinned["head.2.weight"] == "fp16" and size[PINNED_ERROR] <= size[G32]
    # The head-protecting recipes, each with the budget at its own size; their edges hold the edge precision.
    for name, (target, edge_p, which) in RECIPES.items():
        assert size[f"budget @ {name} size"] <= size[name], name
        p = rows[name].plan.precisions
        assert p["head.2.weight"] == edge_p and p["down1.res.0.conv1.weight"] == target, name
        assert p["stem.weight"] == (edge_p if which == "both" else target), name
    for r in rows.values():
        if r.control_of:
            assert 0.99 * size[r.control_of] <= size[r.name] <= size[r.control_of], r.name
    controls = [r for r in rows.values() if r.control_of == "budget 8 bits"]
    assert len(controls) == SMALL.random_seeds and len({tuple(sorted(c.plan.precisions.items())) for c in controls}) == 2
    # Each control samples once, control k at noise seed k mod seeds; the plans they control sample every seed.
    assert [c.seeds for c in controls] == [(0,), (1,)] and rows["budget 8 bits"].seeds is None
    # No two controls of one plan are the same plan (a repeated draw would count one plan twice).
    for of in {r.control_of for r in rows.values() if r.control_of}:
        plans = [tuple(sorted(r.plan.precisions.items())) for r in rows.values() if r.control_of == of]
        assert len(plans) == len(set(plans)), of


def test_report_records_every_seed_resumes_from_disk_and_writes_its_sections(tiny_fisher, tmp_path, monkeypatch):
    m, fm = tiny_fisher
    backend = ClassifierBackend()
    rows = grid(m, fm, SMALL)[:6]
    ev = Evaluator(m, backend.model, backend, tmp_path / "cache", log=lambda _: None)
    records = evaluate(rows, ev, SMALL, log=lambda _: None)
    assert len(records) == 6 * SMALL.seeds and all(r["guidance"] == 3.0 and r["n"] == 10 for r in records)
    fp32 = [r for r in records if r["name"] == "fp32"]
    assert all(r["mad"] == 0 and r["agreement"] == 1 for r in fp32)
    # A second run finds every (plan, seed) on disk and samples nothing.
    import lafq.evaluate
    monkeypatch.setattr(lafq.evaluate, "generate", lambda *a, **k: pytest.fail("sampled again"))
    again = evaluate(rows, Evaluator(m, backend.model, backend, tmp_path / "cache", log=lambda _: None), SMALL,
                     log=lambda _: None)
    assert [(r["name"], r["seed"], r["fid"]) for r in again] == [(r["name"], r["seed"], r["fid"]) for r in records]
    # Rendering from disk samples nothing and leaves out what is not measured yet.
    more = grid(m, fm, SMALL)[:7]
    cached = evaluate(more, Evaluator(m, backend.model, backend, tmp_path / "cache", cached_only=True), SMALL,
                      log=lambda _: None)
    assert len(cached) == len(records) and more[6].name not in {r["name"] for r in cached}
    monkeypatch.undo()
    sens = run_sensitivity(Evaluator(m, backend.model, None, tmp_path / "sens"), fm, SMALL.sensitivity, 3.0,
                           log=lambda _: None)
    assert {r["unit"] for r in sens} == {"embed", "stem", "down1", "down2", "down3", "mid", "up3", "up2", "up1", "head"}
    write(records, SMALL, "python -m lafq report --test", tmp_path, total_rows=len(rows) + 1, sensitivity=sens)
    md = (tmp_path / "report.md").read_text()
    assert "Partial: 6 of 7 rows" in md
    for text in ("backend **classifier**", "N = 10", "guidance 3,", "DDIM-2", "ΔFID vs FP32 (paired)",
                 "## Sensitivity validation", "## The source's table beside ours", "| per-layer ratio p = 0.25 |",
                 f"**budget @ {EDGE} size** vs {EDGE}", "**budget @ int4-g32 size** vs uniform int4-g32"):
        assert text in md, text
    # Every interval can be re-derived from the per-seed CSV.
    back = read_csv(tmp_path / "report.csv")
    assert len(back) == len(records)
    by = {r["name"]: r for r in summarize(back)}
    u4 = [r["fid"] - f["fid"] for r, f in zip((r for r in back if r["name"] == "uniform int4"), (r for r in back if r["name"] == "fp32"))]
    assert by["uniform int4"]["dfid"] == pytest.approx(mean_ci95(u4)[0])
    assert by["uniform int4"]["dfid_ci95"] == pytest.approx(mean_ci95(u4)[1])
    assert len(read_csv(tmp_path / "sensitivity.csv")) == len(sens)
    assert (tmp_path / "sensitivity.svg").read_text().startswith("<svg")
    assert (tmp_path / "report_pareto.svg").read_text().startswith("<svg")


def test_paired_comparisons_and_verdicts():
    recs = [{"name": n, "seed": s, "fid": f, "mad": d, "psnr": 20.0, "feature_distance": d, "agreement": 1.0}
            for n, vals in (("a", [(10.0, 0.10), (12.0, 0.12), (11.0, 0.11)]), ("b", [(11.0, 0.20), (13.1, 0.22), (12.0, 0.21)]))
            for s, (f, d) in enumerate(vals)]
    c = compare(recs, "a", "b")
    assert c["fid"][0] == pytest.approx(-1.0333, abs=1e-3) and c["fid"][2] == 3
    assert verdict("fid", c["fid"], 10) == "better" and verdict("mad", c["mad"], 10) == "better"
    assert verdict("agreement", c["agreement"], 10).startswith("no difference detectable at N = 10 × 3 seeds")
    assert verdict("fid", (1.0, 0.5, 3), 10) == "worse"


def test_the_random_controls_table_names_the_last_layers_format_of_the_plan_and_of_each_control(tiny_fisher, tmp_path):
    from lafq.report import random_section

    m, fm = tiny_fisher
    rows = grid(m, fm, SMALL)
    backend = ClassifierBackend()
    ev = Evaluator(m, backend.model, backend, tmp_path / "cache", log=lambda _: None)
    wanted = ["fp32", "budget 8 bits", *[r.name for r in rows if r.control_of == "budget 8 bits"]]
    records = evaluate([r for r in rows if r.name in wanted], ev, SMALL, log=lambda _: None)
    last = {r["name"]: r["last_layer"] for r in records}
    assert last["fp32"] == "fp32" and set(last.values()) <= {"fp32", "fp16", "int8", "int4", "int4-g32", "int4-g64"}
    table = "\n".join(random_section(records, SMALL))
    controls = [n for n in wanted[2:]]
    counts = {}
    for n in controls:
        counts[last[n]] = counts.get(last[n], 0) + 1
    assert f"| budget 8 bits | {last['budget 8 bits']} | " + ", ".join(f"{p} ×{k}" for p, k in sorted(counts.items())) in table


def test_random_controls_are_paired_with_the_plan_at_each_controls_own_seed():
    def rec(name, seed, fid):
        return {"name": name, "seed": seed, "fid": fid, "mad": fid / 100, "psnr": 20.0, "feature_distance": 0.1,
                "agreement": 1.0}
    recs = [rec("plan", k, 10.0 + k) for k in range(3)] + [rec("r0", 0, 12.0), rec("r1", 1, 14.0), rec("r2", 2, 13.0),
                                                          rec("r3", 0, 11.0)]
    c = compare(recs, "plan", ["r0", "r1", "r2", "r3", "missing"])
    # plan − control at the control's seed: 10−12, 11−14, 12−13, 10−11.
    assert c["fid"][2] == 4 and c["fid"][0] == pytest.approx(mean_ci95([-2.0, -3.0, -1.0, -1.0])[0])
    assert c["fid"][1] == pytest.approx(mean_ci95([-2.0, -3.0, -1.0, -1.0])[1])
    assert compare(recs, "plan", ["missing"]) is None
    assert verdict("fid", c["fid"], 10, "control runs") == "better"


def test_findings_give_no_verdict_from_a_row_or_a_control_set_that_is_not_complete():
    from lafq.report import findings

    def rec(name, seed, fid, **kw):
        return {"name": name, "seed": seed, "fid": fid, "mad": fid / 100, "psnr": 20.0, "feature_distance": 0.1,
                "agreement": 1.0, "accuracy": 1.0, "bytes": 100, "pct_of_fp32": 10.0, "avg_bits": 4.5, "n": 10,
                "seconds": 1.0, "planned_seeds": 3, **kw}
    a = "budget @ int4-g32 size"
    recs = [rec("fp32", k, 10.0) for k in range(3)] + [rec(a, k, 11.0 + k) for k in range(3)]
    recs += [rec("error-only budget @ int4-g32 size", k, 30.0 + k) for k in range(2)]  # 2 of 3 seeds
    recs += [rec("random 0 @ int4-g32 size", 0, 20.0, kind="random", control_of=a, planned_controls=5, planned_seeds=1)]
    text = "\n".join(findings(recs, Settings(n=10, seeds=3, random_seeds=5)))
    assert "vs error-only budget @ int4-g32 size: not yet measured on every seed" in text
    assert "vs its random controls: 1 of 5 measured so far" in text
    assert "(better)" not in text and "(worse)" not in text


def test_the_source_table_gives_intervals_and_verdicts_only_for_rows_measured_on_every_seed():
    from lafq.report import source_section

    def rec(name, seed, fid, mad=0.0):
        return {"name": name, "seed": seed, "fid": fid, "mad": mad, "psnr": 60.0, "feature_distance": 0.0,
                "agreement": 1.0, "accuracy": 1.0, "bytes": 100, "pct_of_fp32": 50.0, "avg_bits": 16.0, "n": 10,
                "seconds": 1.0, "planned_seeds": 3}
    recs = [rec("fp32", k, 10.0 + k) for k in range(3)]
    recs += [rec("uniform fp16", k, 9.9 + k + 0.001 * k, 5e-4) for k in range(3)]  # FID 0.1 lower, every seed
    recs += [rec("layer-ratio fp16", 0, 10.0, 2e-5)]  # 1 of 3 seeds
    text = "\n".join(source_section(recs))
    assert "a detectable decrease (the source measured an increase) at N = 10 × 3 seeds" in text
    assert "| +0.000 (1 of 3 seeds) |" in text  # a value, no interval
    assert "Ratio p = 0.25 is up to 7% better" not in text  # no verdict from one seed
    missing = next(line for line in text.splitlines() if line.startswith("- Not measured on every seed yet:"))
    assert "per-layer ratio p = 0.25" in missing and "uniform FP16" not in missing


def test_spearman_sees_a_monotone_predictor_and_random_sees_nothing():
    measured = {f"u{i}": float(i) for i in range(20)}
    assert spearman(measured, {k: v ** 3 for k, v in measured.items()})[0] == pytest.approx(1.0)
    assert spearman(measured, {k: -v for k, v in measured.items()})[0] == pytest.approx(-1.0)
    recs = [{"unit": k, "seed": s, "mad": v + s, "feature_distance": v, **{f"pred_{p}": v for p in
            ("fisher", "fisher_x_error", "error", "magnitude")}} for k, v in measured.items() for s in range(2)]
    summary = sens_summary(recs)
    assert summary["units"] == 20 and summary["seeds"] == 2
    assert summary["measures"]["mad"]["rho"]["fisher"][0] == pytest.approx(1.0)
    mean, lo, hi = summary["measures"]["mad"]["random"]
    assert lo < mean < hi and abs(mean) < 0.2


def test_the_sampling_batch_size_is_part_of_every_records_spec():
    assert Settings().spec(0).batch_size == 128
    assert Settings(batch_size=256).spec(2) == replace(Settings().spec(2), batch_size=256)


def test_the_main_table_shows_a_single_seed_row_without_an_interval(tmp_path):
    def rec(name, seed, fid, **kw):
        return {"name": name, "seed": seed, "fid": fid, "mad": 0.01 * (name != "fp32"), "psnr": 30.0,
                "feature_distance": 0.05, "agreement": 1.0, "accuracy": 1.0, "bytes": 100, "pct_of_fp32": 10.0,
                "avg_bits": 4.5, "n": 10, "seconds": 1.0, "planned_seeds": 3, "machine": "m", **kw}
    recs = [rec("fp32", k, 10.0 + k) for k in range(3)]
    recs += [rec("random 0 @ budget 6 bits", 1, 20.0, kind="random", planned_seeds=1)]
    write(recs, Settings(n=10, seeds=3), "cmd", tmp_path)
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines()
               if line.startswith("| random 0 @ budget 6 bits"))
    assert "±" not in row and "| 20.000 | +9.000 |" in row
    fp32 = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| fp32 |"))
    assert "11.000 ± " in fp32


def test_edge_layers_are_the_first_and_last_layers_and_a_one_layer_model_is_refused(tiny_model):
    from torch import nn

    from lafq.report import edge_layers

    assert edge_layers(tiny_model) == ("stem", "head")
    with pytest.raises(ValueError, match="share the layer '0'"):
        edge_layers(nn.Sequential(nn.Linear(2, 2)))


def test_a_damaged_cached_record_is_one_error_naming_its_file(tiny_fisher, tmp_path):
    m, fm = tiny_fisher
    backend = ClassifierBackend()
    rows = grid(m, fm, SMALL)[:1]  # fp32
    evaluate(rows, Evaluator(m, backend.model, backend, tmp_path / "cache", log=lambda _: None), SMALL,
             log=lambda _: None)
    cached = sorted((tmp_path / "cache").glob("fid+fidelity-*.json"))
    cached[0].write_text("{}")  # edited, or written by another version
    with pytest.raises(ValueError, match=rf"cached record {re.escape(str(cached[0]))} is damaged \(missing or not a "
                                         r"finite number: seed, n, steps, mad\); delete it to measure that row again"):
        evaluate(rows, Evaluator(m, backend.model, backend, tmp_path / "cache", log=lambda _: None), SMALL,
                 log=lambda _: None)


def test_image_level_tests_pool_the_per_image_values_over_seeds_and_match_the_seed_means(tiny_fisher, tmp_path):
    from scipy.stats import binomtest

    from lafq.report import image_level

    m, fm = tiny_fisher
    rows = {r.name: r for r in grid(m, fm, SMALL)}
    backend = ClassifierBackend()
    ev = Evaluator(m, backend.model, backend, tmp_path / "cache", log=lambda _: None)
    records = evaluate([rows[n] for n in ("fp32", "uniform int4", "uniform int8")], ev, SMALL, log=lambda _: None)
    for r in records:  # the per-image values average to the record's own fidelity
        assert len(r["per_image"]["mad"]) == len(r["per_image"]["agree"]) == SMALL.n
        assert sum(r["per_image"]["mad"]) / SMALL.n == pytest.approx(r["mad"], abs=1e-6)
        assert r["per_image"]["agree"].count("1") / SMALL.n == pytest.approx(r["agreement"])
    t = image_level(records, "uniform int4", "uniform int8")
    a = {r["seed"]: r["per_image"] for r in records if r["name"] == "uniform int4"}
    b = {r["seed"]: r["per_image"] for r in records if r["name"] == "uniform int8"}
    only_a = sum(x == "1" and y == "0" for s in a for x, y in zip(a[s]["agree"], b[s]["agree"]))
    only_b = sum(x == "0" and y == "1" for s in a for x, y in zip(a[s]["agree"], b[s]["agree"]))
    assert (t["images"], t["seeds"], t["kept_by_a_only"], t["kept_by_b_only"]) == (3 * SMALL.n, 3, only_a, only_b)
    n = only_a + only_b
    assert t["mcnemar_p"] == pytest.approx(binomtest(only_a, n, 0.5).pvalue if n else 1.0)
    diffs = [u - v for s in a for u, v in zip(a[s]["mad"], b[s]["mad"])]
    assert t["mad"] == pytest.approx(mean_ci95(diffs))
    assert image_level([{k: v for k, v in r.items() if k != "per_image"} for r in records],
                       "uniform int4", "uniform int8") is None  # records from before per-image values were kept


def test_the_measured_sensitivity_budget_weighs_tensors_by_their_measured_damage_within_the_size(tiny_fisher):
    from lafq.report import MEASURED, measured_budget, measured_scores

    m, fm = tiny_fisher
    w = dict(m.named_parameters())
    shapes = param_shapes(m)
    mats = [n for n, sh in shapes.items() if len(sh) >= 2]
    sens = [{"unit": n, "unit_kind": "tensor", "precision": "int4", "mad": 1e-6, "seed": s} for n in mats for s in (0, 1)]
    sens += [{"unit": "head.2.weight", "unit_kind": "tensor", "precision": "int4", "mad": 1.0, "seed": 2}]
    measured = measured_scores(sens)
    assert measured["head.2.weight"] == pytest.approx((2e-6 + 1.0) / 3) and len(measured) == len(mats)
    rows = {r.name: r for r in grid(m, fm, SMALL, measured=measured)}
    budget = size_report(rows[G32].plan, shapes).total_bytes
    plan = measured_budget(fm, w, measured, budget)
    assert rows[MEASURED].plan.precisions == plan.precisions and size_report(plan, shapes).total_bytes <= budget
    assert plan.precisions["head.2.weight"] in ("fp32", "fp16")  # by far the most damaging alone: kept high
    assert MEASURED not in {r.name for r in grid(m, fm, SMALL)}  # no sensitivity stage: no measured row


def test_each_budget_is_judged_per_metric_against_the_best_head_protecting_baseline_no_larger_than_itself():
    from lafq.report import EDGE, PINNED_ERROR, recipe_verdicts

    def rec(name, seed, mad, size, **kw):
        return {"name": name, "seed": seed, "fid": 10.0 + mad, "mad": mad, "psnr": 30.0 - mad,
                "feature_distance": mad, "agreement": 1.0, "accuracy": 1.0, "bytes": size, "pct_of_fp32": 10.0,
                "avg_bits": size / 100, "n": 10, "seconds": 1.0, "planned_seeds": 3, **kw}
    budget = "budget @ int4-g32 size"
    recs = []
    for k in range(3):
        recs += [rec(budget, k, 1.0 + 0.1 * k, 458), rec(PINNED_ERROR, k, 2.0 + 0.2 * k, 457),
                 rec(EDGE, k, 3.0, 419), rec("int4-g32, fp16 stem+head", k, 0.5, 470)]  # better, but 2.6% larger
    table = "\n".join(recipe_verdicts(recs, Settings(n=10, seeds=3)))
    row = next(line for line in table.splitlines() if line.startswith(f"| {budget} |"))
    assert f"| {PINNED_ERROR} (4.57 bits) |" in row  # the closest no larger than the budget, not the larger recipe
    # budget − pinned per seed: mean |Δ| −1.0, −1.1, −1.2 ‰·1000 → better; agreement equal on every seed → none
    assert "-1100.000 ± " in row and "‰: better" in row and "dB: worse" not in row
    assert "+0.00 ± 0.00 pp: none detectable" in row
    assert recipe_verdicts([r for r in recs if r["seed"] < 2], Settings(n=10, seeds=3)) == []  # not every seed
