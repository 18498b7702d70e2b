"""Quality tab: how far the current plan is from FP32, with the FID backend and N named.

Contracts: the lead number is the paired FID difference to FP32 (every seed samples both models from
the same noise, so the seed-to-seed variation they share cancels), with its 95% interval over seeds;
unpaired FIDs and the real-vs-real floor at the same backend and N follow as context. A user's
evaluations are theirs (UserSession.evaluations) and the chart shows those at the chosen N and steps;
sampled results are cached process-wide by plan and settings (they depend on nothing else).
Fidelity to FP32 (mean |Δ|, PSNR, feature distance, class agreement) is measured image by image on
FIDELITY_N images per seed from the same noise, cached process-wide like the FIDs. The sensitivity chart
shows the shipped validation (docs/sensitivity.csv): each weight matrix lowered alone to INT4, its
measured damage against each predictor.
"""

import math

from lafq.data import DataError
from lafq.metrics import fidelity, mean_ci95
from lafq.pipeline import SampleSpec, evaluate_fid, real_floor
from lafq.report import paired_delta, read_csv, summarize
from lafq.sensitivity import summarize as sensitivity_summary

from . import plots
from .state import (MAX_FID_N, MAX_FID_SEEDS, MAX_STEPS, REPORT_CSV, SENSITIVITY_CSV, AppState, FIDPoint, InputError,
                    Stages, UserSession, as_choice, as_number, as_user, cancellable, duration, plan_key, shown)
from .tab_quantize import current_label, resolve_plan
from .zerogpu import fid_seconds, gpu

QUICK_N = 200
FIDELITY_N = 64  # images per seed: paired per-image differences resolve at small N (the report uses 64 too)
PREDICTOR_LABELS = {"fisher": "Fisher score", "fisher_x_error": "Fisher × ‖Q(w) − w‖²", "error": "‖Q(w) − w‖² alone",
                    "magnitude": "weight magnitude"}
HOW_TO = ("**How to:** press Evaluate. The headline says whether the plan's FID differs measurably from FP32's "
          "from the same noise (paired; the interval needs 2+ seeds). A run longer than about 30 s here shows its "
          "estimate first and starts on a second press.")


def report_points(path=REPORT_CSV) -> list[dict]:
    """The committed report's plans (size vs FID, mean ± 95% CI over its seeds) for context, if present."""
    try:
        rows = summarize(read_csv(path))
    except (OSError, KeyError, ValueError, TypeError, StopIteration):
        return []
    return [{"label": r["name"], "pct_of_fp32": r["pct_of_fp32"], "fid_mean": r["fid"],
             "fid_ci95": 0.0 if math.isnan(r["fid_ci95"]) else r["fid_ci95"], "fp32": r["name"] == "fp32"}
            for r in rows if not math.isnan(r["fid"])]


def report_setting(path=REPORT_CSV) -> str:
    """The committed report's setting in words (N per seed, sampler steps, seeds, backend)."""
    try:
        rows = summarize(read_csv(path))
        r = rows[0]
        return f"N={r['n']:,} per seed, DDIM-{r['steps']}, {r.get('seeds', '?')} seeds, {r.get('backend', '')}".rstrip(", ")
    except (OSError, KeyError, ValueError, TypeError, StopIteration, IndexError):
        return "its own setting"


def sensitivity_data(path=SENSITIVITY_CSV) -> dict:
    """The shipped sensitivity validation, summarised (lafq.sensitivity.summarize), or {} if absent."""
    try:
        return sensitivity_summary(read_csv(path))
    except (OSError, KeyError, ValueError, TypeError, StopIteration):
        return {}


def sensitivity_figure(predictor: str = "fisher_x_error", data: dict | None = None, state: AppState | None = None):
    """The validation chart: the selected model's own (its report's sensitivity.csv) where it has one, else the
    shipped MNIST U-Net's (the model note says which)."""
    predictor = as_choice(predictor, "predictor", list(PREDICTOR_LABELS))
    if data is None:
        data = sensitivity_data(state.sensitivity_csv if state is not None and state.own_sensitivity else SENSITIVITY_CSV)
    if not data:
        return plots.sensitivity([], [], [], PREDICTOR_LABELS[predictor], math.nan, math.nan, "not measured yet")
    measured = data["measures"]["mad"]["measured"]
    units = sorted(measured)
    rho, p = data["measures"]["mad"]["rho"][predictor]
    return plots.sensitivity(units, [measured[u] for u in units], [data["predicted"][predictor][u] for u in units],
                             PREDICTOR_LABELS[predictor], rho, p, f"{data['units']} tensors, {data['seeds']} seeds")


def settings(n, steps, seeds) -> tuple[int, int, int]:
    return (as_number(n, "N", 10, MAX_FID_N, integer=True), as_number(steps, "DDIM steps", 1, MAX_STEPS, integer=True),
            as_number(seeds, "seeds", 1, MAX_FID_SEEDS, integer=True))


NO_CLASSIFIER = "not available for this model: no classifier shipped"


def fid_key(plan, n: int, steps: int, seeds: int) -> tuple:
    """The process-wide cache key of a model's FIDResult (plan None: FP32); `work` asks the same keys."""
    return (plan_key(plan) if plan else "fp32", n, steps, seeds)


def images_key(plan, steps: int, seed: int) -> tuple:
    """The cache key of one seed's fidelity images (plan None: FP32)."""
    return ("images", plan_key(plan) if plan else "fp32", steps, seed)


def _fid(state: AppState, model_plan, n, steps, seeds, progress):
    """One model's FIDResult at these settings (cached process-wide: same plan and settings, same numbers).
    `progress(done, total)` follows the sampling."""
    import time

    key = fid_key(model_plan, n, steps, seeds)
    cached = state.fid_result(key)
    if cached is not None:
        return cached
    model = state.quantized(model_plan) if model_plan else state.model
    t0 = time.perf_counter()
    spec = SampleSpec(n=n, steps=steps, guidance=state.default_guidance, batch_size=100)
    r = evaluate_fid(state.denoiser(model), spec, list(range(seeds)), backend=state.backend(),
                     classifier=state.classifier(), reference=state.reference, stats_dir=state.stats_dir,
                     progress=progress, device=state.device)
    state.record_pace(n * steps * seeds, time.perf_counter() - t0, min(n, 100))
    state.keep_fid_result(key, r)
    return r


def floor(state: AppState, n: int, seeds: int):
    """Real-vs-real FID at this backend and N: what small-N bias alone scores (the model's dataset, offline)."""
    return state.memo(("floor", n, seeds), lambda: real_floor(
        state.backend(), n, list(range(seeds)), train=state.floor_images, reference=state.reference,
        stats_dir=state.stats_dir, offline=True))


def _images(state: AppState, plan, steps: int, seed: int):
    key = images_key(plan, steps, seed)
    cached = state.fid_result(key)
    if cached is None:
        model = state.quantized(plan) if plan else state.model
        cached = state.sample(model, SampleSpec(n=FIDELITY_N, steps=steps, seed=seed, batch_size=FIDELITY_N,
                                                guidance=state.default_guidance))
        state.keep_fid_result(key, cached)
    return cached


def fidelity_lines(state: AppState, plan, n: int, steps: int, seeds: int, progress=None) -> list[str]:
    """Per-image fidelity of the plan to FP32 from the same noise (FIDELITY_N images per seed), one line:
    mean ± 95% interval over seeds of mean |Δ|, PSNR, feature distance and class agreement."""
    def cached(p, seed):
        return state.fid_result(images_key(p, steps, seed)) is not None
    todo = [(seed, k) for seed in range(seeds) for k, p in enumerate((None, plan)) if not cached(p, seed)]
    per_seed, done = [], 0
    for seed in range(seeds):
        pair = []
        for k, p in enumerate((None, plan)):
            pair.append(_images(state, p, steps, seed))
            if progress is not None and (seed, k) in todo:  # only sampled sets move the bar (work() counts them)
                done += 1
                progress(done, len(todo))
        per_seed.append(fidelity(*pair, state.classifier()))

    def stat(name, scale, unit, digits):
        m, ci = mean_ci95([getattr(f, name) * scale for f in per_seed])
        return f"{m:.{digits}f}{unit} {_interval(ci, seeds, digits)}".rstrip()
    return [f"**Fidelity to FP32** ({FIDELITY_N} images × {seeds} seed{'s' if seeds > 1 else ''}, same noise): "
            f"mean |Δ| {stat('mad', 1000, ' ‰', 3)}; PSNR {stat('psnr', 1, ' dB', 2)}; feature distance "
            f"{stat('feature_distance', 100, ' %', 3)}; class agreement {stat('agreement', 100, ' %', 1)}."]


def _interval(ci: float, seeds: int, digits: int = 3) -> str:
    return f"± {ci:.{digits}f}" if seeds > 1 else ""  # one seed: said once, at the top (ONE_SEED)


ONE_SEED = "One seed: no number below has an interval, and there is no verdict; use 2+ seeds for one."


def verdict(d: float, dci: float, n: int, seeds: int) -> str:
    """The paired ΔFID in words: whether it is distinguishable from 0 at this N and number of seeds."""
    where = f"at N={n:,} × {seeds} seeds (paired ΔFID {d:+.3f} ± {dci:.3f})"
    if abs(d) <= dci:
        return f"No measurable difference from FP32 {where}"
    return f"{'Worse' if d > 0 else 'Better'} than FP32 by {abs(d):.3f} ± {dci:.3f} FID {where[:where.index(' (')]}"


def work(state: AppState, plan, n: int, steps: int, seeds: int, include_fp32: bool) -> dict[str, int]:
    """Images × denoising steps each stage of an evaluation still has to sample (cached results: none)."""
    def fid(p):
        return 0 if state.fid_result(fid_key(p, n, steps, seeds)) is not None else n * steps * seeds
    fidelity_work = sum(FIDELITY_N * steps for seed in range(seeds) for p in (None, plan)
                        if state.fid_result(images_key(p, steps, seed)) is None)
    return {"plan": fid(plan), "fp32": fid(None) if include_fp32 else 0, "fidelity": fidelity_work}


def estimate(state: AppState, current: dict, n, steps, seeds, include_fp32: bool, user=None) -> tuple[float, str]:
    """(seconds, a line) an evaluation would take here: the images it still has to sample × the measured pace."""
    n, steps, seeds = settings(n, steps, seeds)
    if not state.has_classifier:
        return 0.0, ""
    plan = resolve_plan(state, current, user)
    image_steps = sum(work(state, plan, n, steps, seeds, bool(include_fp32)).values())
    pace = state.seconds_per_image_step()
    seconds = image_steps * pace
    return seconds, (f"This evaluation samples {image_steps // max(1, steps):,} images × DDIM-{steps}: about "
                     f"**{duration(seconds)}** here (measured {1000 * pace:.1f} ms per image per step). Press "
                     f"**Start** to run it, or lower N or seeds.")


@gpu(duration=fid_seconds)
def evaluate(state: AppState, current: dict, n, steps, seeds, include_fp32: bool, progress=None, cancel=None,
             user: UserSession | None = None):
    """Paired ΔFID to FP32 (lead, with its verdict in words), unpaired FIDs, accuracy and the real-vs-real floor
    for the current plan. Returns (markdown, chart, the user's session with this evaluation added).
    `progress(fraction, desc=...)` moves with every stage's sampling and says the time left; setting `cancel`
    (a Job or Event) stops the job at its next denoising step (raises Cancelled)."""
    n, steps, seeds = settings(n, steps, seeds)
    if not isinstance(include_fp32, bool):
        raise InputError(f"'compare with FP32' must be true or false, got {shown(include_fp32)}")
    user = as_user(user)
    if not state.has_classifier:
        return NO_CLASSIFIER, pareto_figure(state, user, n, steps), user
    plan = resolve_plan(state, current, user)
    label = current_label(current, plan)
    stages = Stages(cancellable(progress, cancel), work(state, plan, n, steps, seeds, include_fp32),
                    "sampling and scoring")
    r = _fid(state, plan, n, steps, seeds, stages.stage("plan"))
    base = _fid(state, None, n, steps, seeds, stages.stage("fp32")) if include_fp32 else None
    size = state.size(plan)
    acc = (100 * sum(r.accuracy) / len(r.accuracy)) if r.accuracy else None
    lines, d, dci = [], None, None
    if base is not None:
        d, dci = paired_delta(r.values, base.values)
        lines.append(f"### {verdict(d, dci, n, seeds)}" if seeds > 1 else
                     f"### ΔFID to FP32 {d:+.3f} (paired, same noise; one seed)")
        lines.append(f"**{label}** at {size.pct_of_fp32:.1f}% of FP32's size. The paired ΔFID is the plan's FID minus "
                     f"FP32's from the same noise: negative is better than FP32, and an interval covering 0 means no "
                     f"measurable difference.")
    else:
        lines.append(f"### FID of **{label}**: {r.mean:.3f} {_interval(r.ci95, seeds)}".rstrip())
        lines.append("Tick 'compare with FP32' for the paired difference and its verdict.")
    if seeds == 1:
        lines.append(ONE_SEED)
    lines += fidelity_lines(state, plan, n, steps, seeds, stages.stage("fidelity"))
    lines.append(f"Unpaired: plan {r.describe()}" + (f"; FP32 {base.describe()}" if base is not None else ""))
    stages.report(1.0)
    try:
        f = floor(state, n, seeds)
    except DataError as e:  # a diffusers model's dataset may be absent where its reference statistics are cached
        lines.append(f"Real-vs-real floor: not available here ({shown(str(e))}).")
    else:
        floor_value = " ".join(filter(None, (f"{f.mean:.3f}", _interval(f.ci95, seeds))))
        lines.append(f"Real-vs-real floor at this backend and N: {floor_value}: absolute FIDs near it are mostly "
                     "small-N bias; the paired difference carries the comparison.")
    point = FIDPoint(label, size.total_bytes, size.pct_of_fp32, r.mean, r.ci95, r.backend, r.n, steps, seeds, acc, d, dci,
                     model=state.model_id)
    points = [point]
    if base is not None:
        points.append(FIDPoint("fp32", size.fp32_bytes, 100.0, base.mean, base.ci95, base.backend, base.n, steps, seeds,
                               (100 * sum(base.accuracy) / len(base.accuracy)) if base.accuracy else None, 0.0, 0.0,
                               model=state.model_id))
    user = user.with_evaluations(points)
    return "\n\n".join(lines), pareto_figure(state, user, n, steps), user


def pareto_figure(state: AppState, user: UserSession | None = None, n: int = QUICK_N, steps: int = 20):
    """The user's evaluations of the state's model at this N and steps in one panel; for the MNIST U-Net, the
    committed report's plans (another N and sampler: another FID scale) in a panel of their own."""
    mine = [p for p in as_user(user).evaluations if p.n == n and p.steps == steps and p.model == state.model_id]
    backend = mine[0].backend if mine else state.backend().name if state.has_classifier else "no classifier"
    panels = {f"your evaluations: N={n:,} per seed, DDIM-{steps}, {backend}": [
        {"label": f"{p.label} ({p.seeds} seed{'s' if p.seeds > 1 else ''})", "pct_of_fp32": p.pct_of_fp32,
         "fid_mean": p.fid_mean, "fid_ci95": p.fid_ci95, "fp32": p.label == "fp32"} for p in mine]}
    report = report_points(state.report_csv) if state.report_csv is not None else []
    if report:
        r = report_setting(state.report_csv)
        panels = {f"the report's plans: {r}": report, **panels}
    return plots.pareto(panels, f"size vs FID for {state.title}: each setting on its own axes")


def model_note(state: AppState) -> str:
    """What the tab measures for the selected model, or the one line saying it cannot."""
    if not state.has_classifier:
        return f"**{state.title}**: FID and fidelity are {NO_CLASSIFIER}."
    try:
        ref = state.reference
    except InputError:
        ref = "its reference set"
    return (f"FID of class-balanced samples of **{state.title}** against {ref}, with {state.fid_features}."
            + ("" if state.own_sensitivity else " The sensitivity chart below is the MNIST U-Net's (this model's "
                                                 "report has no sensitivity stage)."))


def build(models, current, user, guard):
    """The tab for a demo.models.Registry. Returns (refresh, its inputs, its outputs): `refresh(user, n, steps)` re-describes
    the tab for the selected model and shows that model's evaluations."""
    import gradio as gr

    from . import serving
    from .components import disarm, two_press

    state = models.default
    gr.Markdown(HOW_TO, elem_id="howto-quality")
    note = gr.Markdown(model_note(state), elem_id="quality-note")
    with gr.Row():
        # A number box, not a slider: a typed value out of range is refused with the range, never cut to it.
        n = gr.Number(QUICK_N, precision=0, label="N per seed", info=f"10 to {MAX_FID_N:,}", elem_id="fid-n")
        steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="DDIM steps")
        seeds = gr.Slider(1, MAX_FID_SEEDS, value=2, step=1, label="seeds (for the interval)")
        fp32 = gr.Checkbox(True, label="compare with FP32 (paired, same noise)")
    with gr.Row():
        go_btn = gr.Button("Evaluate", variant="primary", elem_id="evaluate")
        cancel = gr.Button("Cancel")
    estimate_note = gr.Markdown(elem_id="fid-estimate")  # the estimate before a long job, beside its button
    result = gr.Markdown(elem_id="fid-result")
    chart = gr.Plot(value=pareto_figure(state), show_label=False)
    armed = gr.State(None)  # the settings the page showed an estimate for: a second press starts them

    # Annotations are evaluated here (no `from __future__ import annotations` in this module) so that
    # gradio recognises gr.Request and passes the session.
    def run(cur, n_, s_, k_, f_, usr, request: gr.Request, progress=gr.Progress()):
        settings(n_, s_, k_)  # bad settings fail at once, not after waiting for the heavy slot
        st = models.state_for(usr)
        if not st.has_classifier:  # a line, not an error, and no wait for the heavy slot
            return evaluate(st, cur, n_, s_, k_, f_, user=usr)
        progress(0, desc="waiting for other jobs")
        with st.job(request.session_hash, serving.event_alive(), heavy=True, kind="evaluation") as job:
            return evaluate(st, cur, n_, s_, k_, f_, progress, cancel=job, user=usr)

    def stop(request: gr.Request):
        if state.jobs.cancel(request.session_hash, "evaluation"):
            gr.Info("Cancelled: the evaluation stops at its next step; nothing was recorded.")
    inputs = [current, n, steps, seeds, fp32, user]
    # A refused setting keeps the last result and says why beside the button (the last output).
    # Not in the heavy queue: the estimate must not wait behind another user's job (the job itself waits for the
    # heavy slot inside, with "waiting for other jobs" on its bar).
    page = two_press(run, lambda cur, n_, s_, k_, f_, usr: estimate(models.state_for(usr), cur, n_, s_, k_, f_, usr),
                     "Evaluate", outputs=3)
    ev = go_btn.click(guard(page, keep=5), [*inputs, armed], [result, chart, user, armed, go_btn, estimate_note],
                      concurrency_id="evaluate", concurrency_limit=16, api_visibility="private", show_progress_on=[result])
    api_btn = gr.Button("fid (API)", visible=False)
    api_ev = api_btn.click(guard(run), inputs, [result, chart, user], api_name="fid", concurrency_id="heavy",
                           concurrency_limit=1)
    cancel.click(stop, None, None, cancels=[ev, api_ev], api_visibility="private")
    gr.on([n.input, steps.input, seeds.input, fp32.input], disarm("Evaluate"), None, [armed, go_btn, estimate_note],
          queue=False, api_visibility="private")
    with gr.Accordion("Where precision matters: each weight matrix lowered alone to INT4 (shipped validation)",
                      open=False):
        gr.Markdown("Measured: the paired mean |Δ| to FP32's images from the same noise with only that tensor at "
                    "INT4. A predictor is useful if it ranks tensors the way the measurement does (Spearman ρ near "
                    "1). Command: `python -m lafq report [--model DIR]` (sensitivity stage); per-seed values in "
                    "its `sensitivity.csv` (the U-Net's: `docs/sensitivity.csv`; a folder's: `DIR/report/`).")
        predictor = gr.Dropdown([(v, k) for k, v in PREDICTOR_LABELS.items()], value="fisher_x_error",
                                label="predictor")
        sens_chart = gr.Plot(value=sensitivity_figure("fisher_x_error", state=state), show_label=False)
    predictor.change(guard(lambda pred, usr: sensitivity_figure(pred, state=models.state_for(usr))), [predictor, user],
                     sens_chart, api_visibility="private", show_progress="hidden")
    # The chart follows the chosen N and steps (one event for both, as in tab_quantize).
    gr.on([n.change, steps.change],
          guard(lambda usr, n_, s_: pareto_figure(models.state_for(usr), usr, *settings(n_, s_, 1)[:2])),
          [user, n, steps], chart, api_visibility="private", show_progress="hidden", trigger_mode="always_last")

    def refresh(usr, n_, s_, pred):
        st = models.state_for(usr)
        return (model_note(st), "", pareto_figure(st, usr, *settings(n_, s_, 1)[:2]), *disarm("Evaluate")(),
                sensitivity_figure(pred, state=st))
    return refresh, [user, n, steps, predictor], [note, result, chart, armed, go_btn, estimate_note, sens_chart]
