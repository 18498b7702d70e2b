"""Quality tab: how far the current plan is from FP32, with the FID backend and N named.

Contracts: the lead number is the paired FID difference to FP32 (every seed samples both models from
the same noise, so the seed-to-seed variation they share cancels), with its 95% interval over seeds;
unpaired FIDs and the real-vs-real floor at the same backend and N follow as context. A user's
evaluations are theirs (UserSession.evaluations) and the chart shows those at the chosen N and steps;
sampled results are cached process-wide by plan and settings (they depend on nothing else).
`fidelity_lines` is where per-image fidelity to FP32 (same noise) joins the readout.
"""

import csv

from lafq.pipeline import SampleSpec, evaluate_fid, real_floor
from lafq.report import paired_delta

from . import plots
from .state import (MAX_FID_N, MAX_FID_SEEDS, MAX_STEPS, REPORT_CSV, AppState, FIDPoint, InputError, UserSession,
                    as_number, as_user, cancellable, plan_key, shown)
from .tab_quantize import current_label, resolve_plan

QUICK_N = 200
HOW_TO = ("**How to:** press Evaluate. The first number is the plan's FID minus FP32's from the same noise "
          "(paired: near 0 means FP32 quality; its interval needs 2+ seeds). Quick settings take seconds on a GPU, "
          "about a minute on 2 CPU cores.")


def report_points(path=REPORT_CSV) -> list[dict]:
    """The committed report's rows (size vs FID) for context, if present."""
    try:
        with open(path, newline="") as f:
            return [{"label": r["name"], "pct_of_fp32": float(r["pct_of_fp32"]), "fid_mean": float(r["fid_mean"]),
                     "fid_ci95": float(r["fid_ci95"]), "source": "fp32" if r["name"] == "fp32" else "report"}
                    for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return []


def settings(n, steps, seeds) -> tuple[int, int, int]:
    return (as_number(n, "N", 10, MAX_FID_N, integer=True), as_number(steps, "DDIM steps", 1, MAX_STEPS, integer=True),
            as_number(seeds, "seeds", 1, MAX_FID_SEEDS, integer=True))


def _fid(state: AppState, model_plan, n, steps, seeds, progress, i, of):
    """One model's FIDResult at these settings (cached process-wide: same plan and settings, same numbers)."""
    key = (plan_key(model_plan) if model_plan else "fp32", n, steps, seeds)
    cached = state.fid_result(key)
    if cached is not None:
        return cached
    model = state.quantized(model_plan) if model_plan else state.model
    prog = (lambda d, t: progress((i + d / t) / of)) if progress is not None else None
    r = evaluate_fid(model, SampleSpec(n=n, steps=steps, batch_size=100), list(range(seeds)),
                     backend=state.backend(), classifier=state.classifier(),
                     num_classes=state.model.cfg.num_classes, progress=prog, device=state.device)
    state.keep_fid_result(key, r)
    return r


def floor(state: AppState, n: int, seeds: int):
    """Real-vs-real FID at this backend and N: what small-N bias alone scores."""
    return state.memo(("floor", n, seeds), lambda: real_floor(state.backend(), n, list(range(seeds))))


def fidelity_lines(state: AppState, plan, n: int, steps: int, seeds: int) -> list[str]:
    """Hook: per-image fidelity of the plan to FP32 from the same noise (pixel |Δ|, PSNR, feature distance,
    class agreement), one markdown line each. None yet; lafq.metrics will provide them."""
    return []


def _interval(ci: float, seeds: int) -> str:
    return f"± {ci:.3f}" if seeds > 1 else "(one seed: no interval; use 2+ seeds)"


def evaluate(state: AppState, current: dict, n, steps, seeds, include_fp32: bool, progress=None, cancel=None,
             user: UserSession | None = None):
    """Paired ΔFID to FP32 (lead), unpaired FIDs, accuracy and the real-vs-real floor for the current plan.
    Returns (markdown, chart, the user's session with this evaluation added).
    Setting `cancel` (a Job or Event) stops the job at its next denoising step (raises Cancelled)."""
    n, steps, seeds = settings(n, steps, seeds)
    if not isinstance(include_fp32, bool):
        raise InputError(f"'compare with FP32' must be true or false, got {shown(include_fp32)}")
    user = as_user(user)
    plan = resolve_plan(state, current, user)
    label = current_label(current, plan)
    progress_of = cancellable((lambda f: progress(f, desc="sampling and scoring")) if progress is not None else None,
                              cancel)
    parts = 2 if include_fp32 else 1
    r = _fid(state, plan, n, steps, seeds, progress_of, 0, parts)
    base = _fid(state, None, n, steps, seeds, progress_of, 1, parts) if include_fp32 else None
    size = state.size(plan)
    acc = (100 * sum(r.accuracy) / len(r.accuracy)) if r.accuracy else None
    lines, d, dci = [], None, None
    if base is not None:
        d, dci = paired_delta(r.values, base.values)
        lines.append(f"### ΔFID to FP32 (paired, same noise): **{d:+.3f}** {_interval(dci, seeds)}")
        lines.append(f"**{label}** at {size.pct_of_fp32:.1f}% of FP32's size; negative is better than FP32, "
                     f"an interval covering 0 means no measurable difference.")
    lines += fidelity_lines(state, plan, n, steps, seeds)
    lines.append(f"Unpaired: plan {r.describe()}" + (f"; FP32 {base.describe()}" if base is not None else ""))
    f = floor(state, n, seeds)
    lines.append(f"Real-vs-real floor at this backend and N: {f.mean:.3f} {_interval(f.ci95, seeds)}: "
                 "absolute FIDs near it are mostly small-N bias; the paired difference carries the comparison.")
    point = FIDPoint(label, size.total_bytes, size.pct_of_fp32, r.mean, r.ci95, r.backend, r.n, steps, seeds, acc, d, dci)
    points = [point]
    if base is not None:
        points.append(FIDPoint("fp32", size.fp32_bytes, 100.0, base.mean, base.ci95, base.backend, base.n, steps, seeds,
                               (100 * sum(base.accuracy) / len(base.accuracy)) if base.accuracy else None, 0.0, 0.0))
    user = user.with_evaluations(points)
    return "\n\n".join(lines), pareto_figure(state, user, n, steps), user


def pareto_figure(state: AppState, user: UserSession | None = None, n: int = QUICK_N, steps: int = 20):
    pts = report_points()
    mine = [p for p in as_user(user).evaluations if p.n == n and p.steps == steps]
    for p in mine:
        pts.append({"label": f"{p.label} ({p.backend}, N={p.n}, {p.seeds} seeds)", "pct_of_fp32": p.pct_of_fp32,
                    "fid_mean": p.fid_mean, "fid_ci95": p.fid_ci95, "source": "you"})
    return plots.pareto(pts, f"size vs FID: your evaluations at N={n}, DDIM-{steps} (red); the report (grey, N=200)")


def build(state: AppState, current, user, guard):
    import gradio as gr

    from . import serving

    gr.Markdown(HOW_TO, elem_id="howto-quality")
    gr.Markdown("FID of class-balanced samples against the held-out MNIST reference, with the feature backend "
                "named (offline: the project's classifier; Inception when its weights are present).")
    with gr.Row():
        n = gr.Slider(10, MAX_FID_N, value=QUICK_N, step=10, label="N per seed")
        steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="DDIM steps")
        seeds = gr.Slider(1, MAX_FID_SEEDS, value=2, step=1, label="seeds (for the interval)")
        fp32 = gr.Checkbox(True, label="compare with FP32 (paired, same noise)")
    with gr.Row():
        go_btn = gr.Button("Evaluate", variant="primary", elem_id="evaluate")
        cancel = gr.Button("Cancel")
    result = gr.Markdown(elem_id="fid-result")
    chart = gr.Plot(value=pareto_figure(state))

    # Annotations are evaluated here (no `from __future__ import annotations` in this module) so that
    # gradio recognises gr.Request and passes the session.
    def run(cur, n_, s_, k_, f_, usr, request: gr.Request, progress=gr.Progress()):
        settings(n_, s_, k_)  # bad settings fail at once, not after waiting for the heavy slot
        progress(0, desc="waiting for other jobs")
        with state.job(request.session_hash, serving.event_alive(), heavy=True) as job:
            return evaluate(state, cur, n_, s_, k_, f_, progress, cancel=job, user=usr)

    def stop(request: gr.Request):
        if state.jobs.cancel(request.session_hash):
            return "Cancelled: the evaluation stops at its next step; nothing was recorded."
        return "Nothing to cancel."
    ev = go_btn.click(guard(run), [current, n, steps, seeds, fp32, user], [result, chart, user], api_name="fid",
                      concurrency_id="heavy", concurrency_limit=1)
    cancel.click(stop, None, result, cancels=[ev], api_visibility="private")
    for c in (n, steps):  # the chart follows the chosen N and steps
        c.change(guard(lambda usr, n_, s_: pareto_figure(state, usr, *settings(n_, s_, 1)[:2])), [user, n, steps], chart,
                 api_visibility="private", show_progress="hidden", trigger_mode="always_last")
