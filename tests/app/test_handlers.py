"""Every handler and figure builder, called directly (no server)."""
import json
from pathlib import Path

import inspect
import re

import numpy as np
import plotly.graph_objects as go
import pytest

from demo import plots, tab_compare, tab_fisher, tab_inside, tab_quality, tab_quantize
from demo.state import InputError
from lafq.policy import Policy

DEFAULT = dict(strategy="layer-ratio", target="fp16", statistic="final", log_threshold=-2, log_encoder=-10,
               log_mid=0, log_decoder=0, p=0.25, k=0, avg_bits=6, protect_mid=False)


def controls(**kw):
    return list({**DEFAULT, **kw}.values())


def test_fisher_figures_by_view_level_and_class(app_state):
    heat, mag, bar = tab_fisher.fisher_figures(app_state, "log", "all", "layers", 0, "down1")
    assert isinstance(heat, go.Figure) and list(heat.data[0].y)[0] == "embed"
    assert np.nanmax(np.array(heat.data[0].z)) == pytest.approx(0)
    heat_t, _, _ = tab_fisher.fisher_figures(app_state, "raw", "7", "tensors", 3, "mid")
    assert len(heat_t.data[0].y) == len(app_state.fisher.names)
    n_down1 = sum(n.startswith("down1.") for n in app_state.fisher.names)
    assert len(bar.data[0].x) == n_down1 and "res.0.conv1.weight" in bar.data[0].x  # the chosen layer's tensors
    assert "down1" in bar.layout.title.text.replace("<br>", " ") and len(mag.data[0].x) == len(app_state.fisher.layer_names())


@pytest.mark.parametrize("args, message", [
    (("weird", "all", "layers", 0, "down1"), "view must be one of"),
    (("log", "11", "layers", 0, "down1"), "class must be one of"),
    (("log", "all", "layers", 99, "down1"), "timestep bin must be in"),
    (("log", "all", "layers", float("nan"), "down1"), "timestep bin must be in"),
    (("log", "all", "layers", 0, "down9"), "layer must be one of"),
])
def test_fisher_figures_reject_bad_input(app_state, args, message):
    with pytest.raises(InputError, match=message):
        tab_fisher.fisher_figures(app_state, *args)


def test_recompute_gives_the_user_a_map_of_their_own_and_reports_progress(app_state):
    old, hooks = app_state.fisher, [m._forward_hooks.copy() for m in app_state.model.modules()]
    calls = []
    user, msg = tab_fisher.recompute(app_state, 2, 2, False, lambda frac, desc: calls.append(frac))
    assert user.fisher.bins == 2 and "2 bins x 2 samples" in msg and calls[-1] == 1.0
    assert app_state.fisher is old  # the shared map is untouched
    assert [m._forward_hooks for m in app_state.model.modules()] == hooks  # and so is the shared model
    assert app_state.fisher_of(user) is user.fisher and app_state.fisher_of(None) is old
    heat, _, _ = tab_fisher.fisher_figures(app_state, "log", "all", "layers", 1, "down1", user)
    assert len(heat.data[0].x) == 2
    back, note = tab_fisher.shipped(app_state, user)
    assert back.fisher is None and "shipped" in note
    with pytest.raises(InputError, match="bins must be in"):
        tab_fisher.recompute(app_state, 10**6, 2, False)


def test_gradio_progress_objects_are_not_dropped_for_being_falsy(app_state):
    """gr.Progress() has len() 0 before it tracks anything, so `if progress:` used to skip it."""
    class Falsy:
        calls = []

        def __len__(self):
            return 0

        def __call__(self, frac, desc=None):
            self.calls.append(frac)
    progress = Falsy()
    assert not progress
    tab_fisher.recompute(app_state, 2, 1, False, progress)
    assert progress.calls and progress.calls[-1] == 1.0


def test_readout_moves_with_the_threshold(app_state):
    sizes = []
    for log_thr in (-10, -3, -1, 0):
        cur = tab_quantize.policy_from_controls(*controls(strategy="global", log_threshold=log_thr))
        md, rows, fig = tab_quantize.readout(app_state, cur)
        sizes.append(sum(r[3] for r in rows))
        assert "% of FP32" in md and isinstance(fig, go.Figure)
    assert sizes[0] > sizes[-1] and sizes == sorted(sizes, reverse=True)
    assert sizes[-1] == sizes[0] // 2  # threshold 1: everything fp16


def test_readout_for_budget_and_every_strategy(app_state):
    for strategy in ("uniform", "global", "groups", "layer-ratio", "layer-std", "budget", "random"):
        cur = tab_quantize.policy_from_controls(*controls(strategy=strategy, target="int8", avg_bits=8))
        md, rows, _ = tab_quantize.readout(app_state, cur)
        assert rows, strategy
    md, _, _ = tab_quantize.readout(app_state, tab_quantize.policy_from_controls(*controls(strategy="budget", avg_bits=8)))
    assert "budget 8 bits" in md


@pytest.mark.parametrize("kw, message", [
    (dict(strategy="magic"), "strategy must be one of"),
    (dict(p=1.5), r"p must be in \[0.0, 1.0\]"),
    (dict(p=float("nan")), "p must be in"),
    (dict(log_threshold="abc"), "log10 threshold must be a number"),
    (dict(target="int3"), "target precision must be one of"),
    (dict(strategy="budget", avg_bits=2), "average bits must be in"),
])
def test_quantize_controls_reject_bad_input(kw, message):
    with pytest.raises(InputError, match=message):
        tab_quantize.policy_from_controls(*controls(**kw))


def test_presets_give_valid_controls_and_name_their_plans(app_state):
    from demo.presets import BUDGET_45, PRESETS, UNIFORM_INT4
    for name in PRESETS:
        values = tab_quantize.controls_for(app_state, name)
        md, rows, _ = tab_quantize.readout(app_state, tab_quantize.policy_from_controls(*values))
        assert "% of FP32" in md and rows
    md, _, _ = tab_quantize.readout(app_state, tab_quantize.policy_from_controls(*tab_quantize.controls_for(app_state, UNIFORM_INT4)))
    assert UNIFORM_INT4 in md
    floor = tab_quantize.budget_floor_bits(app_state, False)
    assert tab_quantize.controls_for(app_state, BUDGET_45)[9] == max(4.5, floor)  # raised to what is possible
    assert tab_quantize.budget_floor_bits(app_state, True) > floor  # protecting mid raises the floor


def test_only_the_chosen_strategys_controls_show():
    assert tab_quantize.visibility("uniform") == [True, True] + [False] * 8 + [True]  # target, protect the middle
    shown = dict(zip(tab_quantize.CONTROL_NAMES, tab_quantize.visibility("budget")))
    assert shown["avg_bits"] and not shown["p"] and not shown["target"]
    assert all(tab_quantize.visibility("some-future-strategy"))


def test_budget_below_floor_is_a_clear_error(app_state):
    cur = tab_quantize.policy_from_controls(*controls(strategy="budget", avg_bits=4.0))
    with pytest.raises(ValueError, match="below the floor"):
        tab_quantize.readout(app_state, cur)


def test_export_then_upload_round_trips_the_plan(app_state, tmp_path):
    cur = tab_quantize.policy_from_controls(*controls(strategy="uniform", target="int4"))
    model_path, plan_path = tab_quantize.export(app_state, cur)
    assert Path(model_path).stat().st_size > 0 and json.loads(Path(plan_path).read_text())["precisions"]
    for path in (model_path, plan_path):
        loaded = tab_quantize.load_upload(app_state, path)
        assert loaded["plan"] == app_state.plan(Policy("uniform", target="int4")).precisions
        md, _, _ = tab_quantize.readout(app_state, loaded)
        assert f"from {Path(path).name}" in md and "loaded plan is active" in md
    again, _ = tab_quantize.export(app_state, cur)  # the same session's next export replaces its folder
    assert not Path(model_path).exists() and Path(again).exists()


@pytest.mark.parametrize("name, content, message", [
    ("x.safetensors", b"not really", "not a valid .safetensors"),
    ("x.json", b"{", "not a LAFQ plan"),
    ("x.json", b'{"precisions": {"nope.weight": "fp16"}}', "lacks"),
    ("x.json", b'{"precisions": {"stem.weight": "int2"}}', "unknown precision"),
    ("x.pt", b"\x80\x04", "accepted files"),
    ("x.json", b"\xff\xfe", "x.json"),
])
def test_bad_uploads_are_refused(app_state, tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(InputError, match=message):
        tab_quantize.load_upload(app_state, str(p))
    with pytest.raises(InputError, match="no file"):
        tab_quantize.load_upload(app_state, None)


def test_compare_gives_two_grids_a_diff_and_timings(app_state):
    cur = tab_quantize.policy_from_controls(*controls(strategy="uniform", target="int4"))
    fp32, plan, uni, diff, md = tab_compare.compare(app_state, cur, "3", 2.0, 3, 0, 4, True)
    assert fp32.shape == plan.shape == uni.shape and fp32.dtype == np.uint8
    assert not np.array_equal(fp32, plan)
    assert "FP32" in md and "mean |Δ| to FP32" in md and "uniform int4" in md
    assert "Plan: **uniform INT4" in md and "dequantized" in md  # named, and why it is not faster
    again = tab_compare.compare(app_state, cur, "3", 2.0, 3, 0, 4, False)
    assert np.array_equal(again[0], fp32) and again[2] is None  # same seed, same images


@pytest.mark.parametrize("args, message", [
    (("3", 2.0, 3, 0, 10**9, False), "images must be in"),
    (("3", float("nan"), 3, 0, 2, False), "guidance must be in"),
    (("3", 2.0, -1, 0, 2, False), "DDIM steps must be in"),
    (("12", 2.0, 3, 0, 2, False), "class must be in"),
    (("3", 2.0, 3, 1.5, 2, False), "seed must be a whole number"),
])
def test_compare_rejects_bad_input(app_state, args, message):
    with pytest.raises(InputError, match=message):
        tab_compare.compare(app_state, None, *args)


def test_quality_is_cached_and_names_backend_and_n(app_state, monkeypatch):
    cur = tab_quantize.policy_from_controls(*controls(strategy="uniform", target="fp16"))
    md, fig, user = tab_quality.evaluate(app_state, cur, 20, 2, 2, True)
    # The verdict on the paired difference leads, in words.
    assert re.match(r"### (No measurable difference from FP32|(Worse|Better) than FP32 by [0-9.]+ ± [0-9.]+ FID) "
                    r"at N=20 × 2 seeds", md), md.splitlines()[0]
    assert "backend=classifier" in md and "N=20" in md and "FP32" in md and md.count("accuracy") == 2  # once per row
    assert "Real-vs-real floor" in md
    assert "**Fidelity to FP32** (64 images × 2 seeds, same noise): mean |Δ|" in md and "class agreement" in md
    assert {t.name for t in fig.data} == {"plans", "FP32"} and len(user.evaluations) == 2
    import lafq.pipeline as pipeline
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: pytest.fail("cache miss"))
    md2, _, again = tab_quality.evaluate(app_state, cur, 20, 2, 2, True, user=user)
    assert md2 == md and len(again.evaluations) == 2  # the same evaluation replaces, not repeats
    _, other_fig, other = tab_quality.evaluate(app_state, cur, 20, 2, 2, True)  # another user: their own list
    assert len(other.evaluations) == 2
    monkeypatch.undo()
    md1, _, _ = tab_quality.evaluate(app_state, cur, 20, 2, 1, True)
    assert md1.count("One seed") == 1 and "± nan" not in md1.split("Unpaired")[0]  # the caveat once, at the top
    with pytest.raises(InputError, match="N must be in"):
        tab_quality.evaluate(app_state, cur, 10**7, 2, 2, True)


def test_quality_shows_the_shipped_sensitivity_and_report_from_their_csv_files(tmp_path):
    from lafq.report import CSV_FIELDS, SENS_FIELDS, _csv

    sens = [{"unit": f"layer{i}.weight", "seed": s, "mad": 0.001 * (i + 1), "feature_distance": 0.01 * (i + 1),
             "pred_fisher": float(i), "pred_fisher_x_error": float(i + 1), "pred_error": float(10 - i),
             "pred_magnitude": 1.0 + (i % 3)} for i in range(6) for s in range(2)]
    (tmp_path / "sensitivity.csv").write_bytes(_csv(sens, SENS_FIELDS))
    data = tab_quality.sensitivity_data(tmp_path / "sensitivity.csv")
    fig = tab_quality.sensitivity_figure("fisher_x_error", data)
    assert "ρ = +1.000" in fig.layout.title.text.replace("<br>", " ") and "6 tensors, 2 seeds" in fig.layout.title.text.replace("<br>", " ")
    assert len(fig.data[0].x) == 6
    assert "ρ = -1.000" in tab_quality.sensitivity_figure("error", data).layout.title.text.replace("<br>", " ")
    with pytest.raises(InputError, match="predictor"):
        tab_quality.sensitivity_figure("astrology", data)
    assert "not measured yet" in tab_quality.sensitivity_figure("fisher", {}).layout.title.text.replace("<br>", " ")
    recs = [{"name": n, "seed": s, "bytes": b, "pct_of_fp32": p, "avg_bits": 32 * p / 100, "n": 100, "steps": 10,
             "fid": f + s, "mad": 0.0, "psnr": 100.0, "feature_distance": 0.0, "agreement": 1.0, "seconds": 1.0}
            for n, b, p, f in (("fp32", 400, 100.0, 20.0), ("uniform int4", 52, 13.0, 40.0)) for s in range(3)]
    (tmp_path / "report.csv").write_bytes(_csv(recs, CSV_FIELDS))
    pts = tab_quality.report_points(tmp_path / "report.csv")
    assert [(p["fp32"], p["fid_mean"]) for p in pts] == [(True, 21.0), (False, 41.0)]
    assert pts[1]["fid_ci95"] > 0 and tab_quality.report_setting(tmp_path / "report.csv").startswith("N=100 per seed, DDIM-10")
    (tmp_path / "old.csv").write_text("name,fid_mean\nfp32,1\n")
    assert tab_quality.report_points(tmp_path / "old.csv") == []  # an unreadable report is left out, not an error


def test_inside_views(app_state):
    heat, maps = tab_inside.activations(app_state, "5", 4, 0, "mid")
    assert list(heat.data[0].y) == ["stem", "down1", "down2", "down3", "mid", "up3", "up2", "up1", "head"]
    assert len(heat.data[0].x) == 4 and len(maps.data) >= 3
    sal = tab_inside.saliency_panels(app_state, "5", 300, 0)
    assert len(sal.data) == 4 and np.asarray(sal.data[3].z).max() > 0
    cur = tab_quantize.policy_from_controls(*controls(strategy="uniform", target="int4"))
    err = tab_inside.quant_error(app_state, cur, "5", 4, 0)
    z = np.asarray(err.data[0].z)
    assert z.shape == (9, 4) and (z > 0).all()
    with pytest.raises(InputError, match="layer must be one of"):
        tab_inside.activations(app_state, "5", 4, 0, "embed")


def test_the_drift_view_shows_each_weight_layers_input_range_per_timestep_bin_over_its_narrowest(app_state):
    fig = tab_inside.drift(app_state, 6, 0)
    z, rows = np.asarray(fig.data[0].z), list(fig.data[0].y)
    assert "stem" in rows and "head.2" in rows and z.shape == (len(rows), 6)  # every conv and linear, 6 bins
    assert np.allclose(z.min(1), 1) and z.max() > 1.2  # each row over its narrowest bin; ranges do drift
    assert f"{z.max():.1f}×" in fig.layout.title.text
    with pytest.raises(InputError, match="DDIM steps"):
        tab_inside.drift(app_state, 1, 0)


def test_plot_builders_are_pure():
    fig = plots.heatmap(["a", "b"], [1, 2, 3], np.ones((2, 3)), "t", "c")
    assert fig.data[0].z.shape == (2, 3)
    pm = plots.plan_by_layer(["a", "b"], [1.0, 0.1], "F", {"fp32": [10, 0], "int4": [0, 50], "int8": [0, 0]}, "t")
    assert {t.name for t in pm.data} == {"Fisher", "fp32", "int4"} and list(pm.data[2].x) == [0, 100]
    pa = plots.pareto({"yours": [{"label": "a", "pct_of_fp32": 50, "fid_mean": 3, "fid_ci95": 1}], "report": []}, "t")
    assert pa.data[0].error_y.array[0] == 1 and "press Evaluate" in pa.layout.annotations[-1].text  # the empty panel
    assert len(plots.image_panels([np.zeros((2, 2))] * 3, ["a", "b", "c"], "t").data) == 3


def test_cancel_stops_the_worker_not_just_the_page(app_state):
    """Cancel sets the session's flag; the running job stops at its next step and caches nothing."""
    from demo.state import Cancelled

    cur = tab_quantize.policy_from_controls(*controls(strategy="uniform", target="int8"))
    flag = app_state.jobs.start("session-a")
    other = app_state.jobs.start("session-b")
    app_state.fid_cache.clear()
    calls = []

    def progress(frac, desc):
        calls.append(frac)
        app_state.jobs.cancel("session-a")  # the user presses Cancel during the first step

    cached = set(app_state.fid_cache)
    with pytest.raises(Cancelled):
        tab_quality.evaluate(app_state, cur, 30, 7, 2, False, progress, cancel=flag)
    assert len(calls) == 1 and set(app_state.fid_cache) == cached  # 14 steps were asked for; one ran
    assert not other.is_set()  # another session's job is untouched
    app_state.jobs.finish("session-a", flag)
    app_state.jobs.cancel("session-a")  # no job: nothing to do, no error
    old = app_state.fisher
    with pytest.raises(Cancelled):
        tab_fisher.recompute(app_state, 3, 2, False, lambda f, desc: None, cancel=other.set() or other)
    assert app_state.fisher is old and not app_state.model.training


@pytest.fixture(scope="module")
def hostile(app_state):
    from tests.app.hostile import hostile_files

    cur = tab_quantize.policy_from_controls(*controls(strategy="layer-ratio", target="int8", p=0.5))  # fp32 and int8
    model_path, _ = tab_quantize.export(app_state, cur, session="hostile-fixtures")
    return hostile_files(Path(model_path).read_bytes())


def test_every_hostile_file_is_refused_in_one_line_naming_the_problem(app_state, hostile, tmp_path):
    for name, (data, message) in hostile.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(InputError) as e:
            tab_quantize.load_upload(app_state, str(p))
        text = str(e.value)
        assert message in text and "\n" not in text and len(text) < 400, (name, text)


def test_an_oversized_upload_is_refused_by_size(app_state, tmp_path):
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.truncate(200 * 2**20)  # sparse: 200 MiB that take no disk
    with pytest.raises(InputError, match="200 MiB; the limit is 64 MiB"):
        tab_quantize.load_upload(app_state, str(big))


def test_log_axes_print_powers_of_ten_and_image_grids_wrap():
    fig = plots.bars(["a", "b"], [1e-5, 1e-13], "t", "y", log=True)
    assert fig.layout.yaxis.exponentformat == "power" and fig.layout.yaxis.dtick == 1  # 10⁻⁵, not "10μ"
    pm = plots.plan_by_layer(["x"], [0.5], "F", {"fp32": [10]}, "t")
    assert pm.layout.xaxis.type == "log" and pm.layout.xaxis.exponentformat == "power"
    six = plots.image_panels([np.zeros((2, 2))] * 6, list("abcdef"), "t")
    assert six.layout.height > plots.image_panels([np.zeros((2, 2))] * 3, list("abc"), "t").layout.height  # two rows


def test_a_refused_control_value_keeps_the_last_good_readout_and_warns_inline(app_state):
    import gradio as gr

    from demo.ui import guard

    def below_floor(*_):
        tab_quantize.readout(app_state, tab_quantize.policy_from_controls(*controls(strategy="budget", avg_bits=4.0)))
    out = guard(below_floor, keep=4)()
    assert len(out) == 5 and all(isinstance(o, type(gr.skip())) for o in out[:4])
    assert out[4].startswith("⚠️") and "below the floor" in out[4] and "\n" not in out[4]
    with pytest.raises(gr.Error, match="below the floor"):  # the API endpoint raises instead
        guard(below_floor)()


def test_two_responses_with_identical_images_get_files_of_their_own():
    """Gradio writes image outputs in place at a content-hash path; identical images sent to two users at
    once could be read half-written (seen as 'peer closed connection' under load). Each response is unique."""
    from gradio.processing_utils import encode_pil_to_bytes

    grid = np.zeros((28, 28), np.uint8)
    first, second = tab_compare.served((grid, grid, None, "fig", "md")), tab_compare.served((grid, grid, None, "fig", "md"))
    assert encode_pil_to_bytes(first[0]) != encode_pil_to_bytes(second[0]) and first[2] is None
    assert np.array_equal(np.asarray(first[0]), grid)  # the pixels are unchanged


def test_an_evaluation_is_estimated_from_the_measured_pace_and_cached_work_costs_nothing(app_state):
    cur = tab_quantize.policy_from_controls(*controls(strategy="uniform", target="int8"))
    plan = tab_quantize.resolve_plan(app_state, cur)
    assert tab_quality.work(app_state, plan, 30, 3, 2, True) == {"plan": 180, "fp32": 180, "fidelity": 4 * 64 * 3}
    seconds, line = tab_quality.estimate(app_state, cur, 30, 3, 2, True)
    assert seconds == pytest.approx(1128 * app_state.seconds_per_image_step()) and "376 images × DDIM-3" in line
    tab_quality.evaluate(app_state, cur, 30, 3, 2, True)
    assert tab_quality.work(app_state, plan, 30, 3, 2, True) == {"plan": 0, "fp32": 0, "fidelity": 0}
    assert tab_quality.estimate(app_state, cur, 30, 3, 2, True)[0] == 0  # all cached: nothing to confirm


def test_progress_over_stages_moves_by_their_work_and_says_the_time_left():
    from demo.state import Stages

    seen, now = [], [0.0]
    stages = Stages(lambda f, desc: seen.append((round(f, 3), desc)), {"a": 300, "cached": 0, "b": 100}, "job",
                    clock=lambda: now[0])
    now[0] = 30.0
    stages.stage("a")(1, 2)  # half of a = 3/8 of the job in 30 s: 50 s left
    stages.stage("b")(1, 1)
    assert seen == [(0.375, "job · about 50 s left"), (1.0, "job · about 0 s left")]


def test_verdicts_say_whether_the_paired_difference_is_measurable():
    assert tab_quality.verdict(0.5, 1.0, 200, 3).startswith("No measurable difference from FP32 at N=200 × 3 seeds")
    assert tab_quality.verdict(2.0, 1.0, 200, 3) == "Worse than FP32 by 2.000 ± 1.000 FID at N=200 × 3 seeds"
    assert tab_quality.verdict(-2.0, 1.0, 1000, 3).startswith("Better than FP32 by 2.000")


def test_a_recompute_is_estimated_from_the_sampling_pace_then_from_its_own(app_state, monkeypatch):
    monkeypatch.setattr(app_state, "_fisher_seconds", None)  # no recompute measured yet
    seconds, line = tab_fisher.estimate(app_state, 4, 4, True)  # per digit: 10 maps' worth
    assert seconds == pytest.approx(160 * tab_fisher.FISHER_STEP_FACTOR * app_state.seconds_per_image_step())
    assert "160 per-sample gradients" in line
    user, _ = tab_fisher.recompute(app_state, 2, 2, False)
    assert tab_fisher.estimate(app_state, 4, 4, False)[0] == pytest.approx(16 * user.fisher.meta["seconds"] / 4)


def test_a_two_press_button_runs_a_long_job_on_the_second_press_with_the_same_settings():
    import gradio as gr

    from demo.components import two_press

    ran = []

    def run(a, b, request: gr.Request, progress=gr.Progress()):
        ran.append((a, b, request))
        return f"done {a}", b

    page = two_press(run, lambda a, b: (60.0 * a, f"about {a} min"), "Go", outputs=2)
    assert list(inspect.signature(page).parameters) == ["a", "b", "armed", "request", "progress"]
    from gradio.helpers import special_args
    filled, progress_at, _, _ = special_args(page, [1, "x", None], request="the request")  # as Gradio calls it
    assert filled[3] == "the request" and progress_at == 4
    *skipped, armed, button, line = page(2, "x", None, "req", None)  # 120 s: an estimate, nothing run
    assert not ran and line == "about 2 min" and button.value == "Start (about 2 min)"
    assert page(3, "x", armed, "req", None)[-1] == "about 3 min" and not ran  # other settings: a new estimate
    out = page(2, "x", armed, "req", None)  # the same settings again: it runs
    assert out[:3] == ("done 2", "x", None) and out[3].value == "Go" and out[4] == "" and ran == [(2, "x", "req")]
    out = page(0.1, "y", None, "req", None)  # 6 s: at once
    assert out[:3] == ("done 0.1", "y", None) and out[-1] == ""


def test_a_session_runs_one_job_at_a_time_and_each_tabs_cancel_stops_only_its_own_kind():
    from demo.state import Jobs

    jobs = Jobs()
    job = jobs.start("a", kind="evaluation")
    with pytest.raises(InputError, match="your evaluation is still running: cancel it or wait for it"):
        jobs.start("a", kind="recompute")
    assert jobs.start("b", kind="recompute") is not None  # another session is not held up
    assert not jobs.cancel("a", "recompute") and not job.is_set()  # Fisher's Cancel leaves the evaluation alone
    assert jobs.cancel("a", "evaluation") and job.is_set()
    jobs.finish("a", job)
    assert jobs.start("a", kind="recompute") is not None


def test_the_pace_behind_estimates_prefers_the_largest_batch_measured(app_state, monkeypatch):
    monkeypatch.setattr(app_state, "_step_seconds", None)
    monkeypatch.setattr(app_state, "_pace_batch", 0)
    app_state.record_pace(80, 8.0, batch=4)  # the first screen's 4 images: 0.1 s per image-step
    app_state.record_pace(2000, 20.0, batch=100)  # a FID run's batches: 0.01 s (a GPU's batching wins)
    assert app_state.seconds_per_image_step() == pytest.approx(0.01)
    app_state.record_pace(80, 8.0, batch=4)  # a later small batch does not drag it back
    app_state.record_pace(2000, 40.0, batch=100)  # the same batch size: recent runs count most
    assert app_state.seconds_per_image_step() == pytest.approx(0.7 * 0.01 + 0.3 * 0.02)
