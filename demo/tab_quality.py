"""Quality tab: FID (backend and N named, CI over seeds) and accuracy of the current plan; a Pareto chart."""

import csv

from lafq.pipeline import SampleSpec, evaluate_fid

from . import plots
from .state import (MAX_FID_N, MAX_FID_SEEDS, MAX_STEPS, REPORT_CSV, AppState, FIDPoint, as_number, cancellable,
                    plan_key)
from .tab_quantize import resolve_plan
from .zerogpu import fid_seconds, gpu

QUICK_N = 200


def report_points(path=REPORT_CSV) -> list[dict]:
    """The committed report's rows (size vs FID) for context, if present."""
    try:
        with open(path, newline="") as f:
            return [{"label": r["name"], "pct_of_fp32": float(r["pct_of_fp32"]), "fid_mean": float(r["fid_mean"]),
                     "fid_ci95": float(r["fid_ci95"]), "source": "fp32" if r["name"] == "fp32" else "report"}
                    for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return []


@gpu(duration=fid_seconds)
def evaluate(state: AppState, current: dict, n, steps, seeds, include_fp32: bool, progress=None, cancel=None):
    """FID + accuracy for the current plan (and FP32 at the same settings); cached per plan and settings.
    Setting `cancel` (a threading.Event) stops the job at its next denoising step (raises Cancelled)."""
    n = as_number(n, "N", 10, MAX_FID_N, integer=True)
    steps = as_number(steps, "DDIM steps", 1, MAX_STEPS, integer=True)
    seeds = as_number(seeds, "seeds", 1, MAX_FID_SEEDS, integer=True)
    plan = resolve_plan(state, current)
    targets = [("plan " + plan_key(plan), plan)]
    if include_fp32:
        targets.insert(0, ("fp32", None))
    lines = []
    for i, (label, p) in enumerate(targets):
        key = (plan_key(p) if p else "fp32", n, steps, seeds)
        if key not in state.fid_cache:
            model = state.quantized(p) if p else state.model
            prog = cancellable((lambda d, t, i=i: progress((i + d / t) / len(targets), desc=f"{label}: sampling and scoring"))
                               if progress else None, cancel)
            r = evaluate_fid(model, SampleSpec(n=n, steps=steps, batch_size=100), list(range(seeds)),
                             backend=state.backend(), classifier=state.classifier(),
                             num_classes=state.model.cfg.num_classes, progress=prog, device=state.device)
            size = state.size(p) if p else None
            fp32_bytes = 4 * sum(q.numel() for q in state.model.parameters())
            point = FIDPoint(label, size.total_bytes if size else fp32_bytes, size.pct_of_fp32 if size else 100.0,
                             r.mean, r.ci95, r.backend, r.n,
                             100 * sum(r.accuracy) / len(r.accuracy) if r.accuracy else None)
            with state.lock:
                state.fid_cache[key] = (r, point)
                state.pareto.append(point)
        r, point = state.fid_cache[key]
        lines.append(f"**{label}** ({point.pct_of_fp32:.1f}% of FP32): {r.describe()}")  # describe() has accuracy
    return "\n\n".join(lines), pareto_figure(state)


def pareto_figure(state: AppState):
    pts = report_points()
    for p in state.pareto:
        pts.append({"label": f"{p.label} ({p.backend}, N={p.n})", "pct_of_fp32": p.pct_of_fp32, "fid_mean": p.fid_mean,
                    "fid_ci95": p.fid_ci95, "source": "fp32" if p.label == "fp32" else "you"})
    return plots.pareto(pts, "size vs FID: your evaluations (red), the report (grey)")


def build(state: AppState, current, guard):
    import gradio as gr

    gr.Markdown(f"FID of class-balanced samples against the held-out MNIST reference, with the feature backend "
                f"named (offline: the project's classifier; Inception when its weights are present). Quick: N={QUICK_N}. "
                f"Results are cached per plan and settings.")
    with gr.Row():
        n = gr.Slider(10, MAX_FID_N, value=QUICK_N, step=10, label="N per seed")
        steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="DDIM steps")
        seeds = gr.Slider(1, MAX_FID_SEEDS, value=2, step=1, label="seeds (for the CI)")
        fp32 = gr.Checkbox(True, label="also FP32 at the same settings")
    with gr.Row():
        go_btn = gr.Button("Evaluate", variant="primary")
        cancel = gr.Button("Cancel")
    result = gr.Markdown(elem_id="fid-result")
    chart = gr.Plot(value=pareto_figure(state))

    # Annotations are evaluated here (no `from __future__ import annotations` in this module) so that
    # gradio recognises gr.Request and passes the session.
    def run(cur, n_, s_, k_, f_, request: gr.Request, progress=gr.Progress()):
        flag = state.jobs.start(request.session_hash)
        try:
            return evaluate(state, cur, n_, s_, k_, f_, progress, cancel=flag)
        finally:
            state.jobs.finish(request.session_hash, flag)

    def stop(request: gr.Request):
        state.jobs.cancel(request.session_hash)
    ev = go_btn.click(guard(run), [current, n, steps, seeds, fp32], [result, chart], api_name="fid",
                      concurrency_id="heavy", concurrency_limit=1)
    cancel.click(stop, None, None, cancels=[ev], api_visibility="undocumented")
