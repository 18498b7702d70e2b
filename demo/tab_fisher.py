"""Fisher tab: where the loss is sensitive, by layer or weight tensor, over timesteps."""

from lafq.fisher import VIEWS, compute_fisher
from lafq.model import layer_of

from . import plots
from .state import MAX_BINS, MAX_FISHER_SAMPLES, AppState, InputError, as_choice, as_number, cancellable
from .zerogpu import fisher_seconds, gpu

COLORBAR = {"raw": "E[(dL/dθ)²]", "normalized": "F / max F", "log": "log10(F / max F)"}
GROUPS = ["all"] + [str(d) for d in range(10)]


def fisher_figures(state: AppState, view: str, group: str, level: str, t_bin, layer: str):
    """Heatmap (layers or tensors × timestep), weight-magnitude bars, per-tensor bars inside one layer at one bin."""
    fm = state.fisher
    view = as_choice(view, "view", VIEWS)
    level = as_choice(level, "level", ("layers", "tensors"))
    group = as_choice(str(group), "class", GROUPS)
    if group not in fm.groups:
        raise InputError(f"this Fisher map has no per-digit maps (groups: {fm.groups}); recompute with 'per digit' on")
    b = as_number(t_bin, "timestep bin", 0, fm.bins - 1, integer=True)
    layer = as_choice(layer, "layer", fm.layer_names())
    rows, m = fm.view(view, group, per_layer=(level == "layers"))
    cols = [int(c) for c in fm.bin_centers()]
    title = f"Fisher by {level[:-1]} and timestep ({view}; class {group})"
    heat = plots.heatmap(rows, cols, m.numpy(), title, COLORBAR[view])
    layers, mag = fm.layer_magnitude()
    mag_fig = plots.bars(layers, mag.numpy(), "mean |w| per layer (weight magnitude)", "mean |w|")
    idx = [i for i, n in enumerate(fm.names) if layer_of(n) == layer]
    _, raw = fm.view("raw", group)
    lo, hi = fm.bin_edges[b], fm.bin_edges[b + 1] - 1
    bar = plots.bars([fm.names[i][len(layer) + 1:] for i in idx], raw[idx, b].numpy(),
                     f"Fisher per weight tensor in {layer}, t in [{lo}, {hi}]", "E[(dL/dθ)²]", log=True)
    return heat, mag_fig, bar


@gpu(duration=fisher_seconds)
def recompute(state: AppState, bins, samples, per_class: bool, progress=None, cancel=None) -> str:
    """Recompute the map for the loaded model (vectorised per-sample gradients); replaces the app's map."""
    bins = as_number(bins, "bins", 1, MAX_BINS, integer=True)
    samples = as_number(samples, "samples per bin", 1, MAX_FISHER_SAMPLES, integer=True)
    from lafq.data import load_dataset

    x, y = load_dataset("mnist-test10k").tensors()
    fm = compute_fisher(state.model, x, y, bins=bins, samples_per_bin=samples, per_class=bool(per_class),
                        progress=cancellable((lambda d, t: progress(d / t, desc=f"bin {d}/{t}")) if progress else None,
                                             cancel))
    with state.lock:
        state.fisher = fm
        state.fisher_note = f"recomputed: {bins} bins x {samples} samples{' per digit' if per_class else ''}"
    return f"{state.fisher_note} in {fm.meta['seconds']:.1f}s"


def build(state: AppState, guard):
    import gradio as gr

    fm = state.fisher
    gr.Markdown(f"Empirical Fisher of the denoising loss (mean of squared per-sample gradients). {state.fisher_note}.")
    with gr.Row():
        view = gr.Radio(list(VIEWS), value="log", label="view")
        level = gr.Radio(["layers", "tensors"], value="layers", label="rows")
        group = gr.Dropdown(GROUPS, value="all", label="class")
    heat = gr.Plot()
    with gr.Row():
        layer = gr.Dropdown(fm.layer_names(), value="down1", label="layer (bar chart)")
        t_bin = gr.Slider(0, fm.bins - 1, value=0, step=1, label="timestep bin (0 = the final denoising steps)")
    with gr.Row():
        bar = gr.Plot()
        mag = gr.Plot()
    with gr.Accordion("Recompute the Fisher map", open=False):
        with gr.Row():
            bins = gr.Slider(1, MAX_BINS, value=fm.bins, step=1, label="timestep bins")
            samples = gr.Slider(1, MAX_FISHER_SAMPLES, value=16, step=1, label="samples per bin")
            per_class = gr.Checkbox(False, label="per digit (10x the work)")
        with gr.Row():
            go_btn = gr.Button("Recompute")
            cancel = gr.Button("Cancel")
        status = gr.Markdown()
    inputs = [view, group, level, t_bin, layer]

    def figures(*vals):
        return fisher_figures(state, *vals)
    for c in inputs:
        c.change(guard(figures), inputs, [heat, mag, bar], trigger_mode="always_last", concurrency_id="readout",
                 show_progress="hidden", api_visibility="undocumented")

    # Annotations are evaluated here (no `from __future__ import annotations` in this module) so that
    # gradio recognises gr.Request and passes the session.
    def run(b, s, pc, request: gr.Request, progress=gr.Progress()):
        flag = state.jobs.start(request.session_hash)
        try:
            msg = recompute(state, b, s, pc, progress, cancel=flag)
        finally:
            state.jobs.finish(request.session_hash, flag)
        nb = state.fisher.bins - 1
        return msg, gr.Slider(maximum=nb, value=min(nb, 0))
    ev = go_btn.click(guard(run), [bins, samples, per_class], [status, t_bin], api_name="recompute_fisher",
                      concurrency_id="heavy", concurrency_limit=1)
    ev.then(guard(figures), inputs, [heat, mag, bar])
    def stop(request: gr.Request):
        state.jobs.cancel(request.session_hash)
    cancel.click(stop, None, None, cancels=[ev], api_visibility="undocumented")
    return figures, inputs, [heat, mag, bar]
