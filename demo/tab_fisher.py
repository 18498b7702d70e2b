"""Fisher tab: where the loss is sensitive, by layer or weight tensor, over timesteps.

A recompute runs on a private copy of the FP32 model (its hooks never touch the model other users
sample from) and its map becomes the requesting user's own (UserSession.fisher): other users' maps
and plans do not change, and "Back to the shipped map" undoes it. A failed or cancelled recompute
changes nothing.
"""

from lafq.fisher import VIEWS, compute_fisher
from lafq.model import layer_of

from . import plots
from .state import (MAX_BINS, MAX_FISHER_SAMPLES, AppState, InputError, UserSession, as_choice, as_number, as_user,
                    cancellable)
from .zerogpu import fisher_seconds, gpu

COLORBAR = {"raw": "E[(dL/dθ)²]", "normalized": "F / max F", "log": "log10(F / max F)"}
GROUPS = ["all"] + [str(d) for d in range(10)]
HOW_TO = ("**Start here:** the heatmap shows where the denoising loss is most sensitive to each layer's weights "
          "(bright = sensitive: keep it precise). Then open **Quantize** and pick a preset, or **Compare** to see "
          "the result.")


def fisher_figures(state: AppState, view: str, group: str, level: str, t_bin, layer: str, user=None):
    """Heatmap (layers or tensors × timestep), weight-magnitude bars, per-tensor bars inside one layer at one bin."""
    fm = state.fisher_of(user)
    view = as_choice(view, "view", VIEWS)
    level = as_choice(level, "level", ("layers", "tensors"))
    group = as_choice(str(group) if isinstance(group, (str, int)) else group, "class", GROUPS)
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


def fisher_settings(bins, samples) -> tuple[int, int]:
    """Validate recompute settings (before a job waits for the heavy slot)."""
    return (as_number(bins, "bins", 1, MAX_BINS, integer=True),
            as_number(samples, "samples per bin", 1, MAX_FISHER_SAMPLES, integer=True))


@gpu(duration=fisher_seconds)
def recompute(state: AppState, bins, samples, per_class: bool, progress=None, cancel=None,
              user: UserSession | None = None) -> tuple[UserSession, str]:
    """Recompute the map for the loaded model; returns the user's new session (their own map) and a status line.
    The shared model and map are untouched; `cancel` (a Job or Event) stops it at its next bin."""
    bins, samples = fisher_settings(bins, samples)
    from lafq.data import load_dataset

    x, y = load_dataset("mnist-test10k").tensors()
    # `is not None`: gr.Progress() is falsy (its __len__ is 0 before any tracking), so `if progress` dropped it.
    report = (lambda d, t: progress(d / t, desc=f"bin {d}/{t}")) if progress is not None else None
    model = state.private_model()  # the hooks go on a copy: the shared model keeps serving Compare, FID, Inside
    try:
        fm = compute_fisher(model, x, y, bins=bins, samples_per_bin=samples, per_class=bool(per_class),
                            progress=cancellable(report, cancel))
    finally:
        del model
    note = f"your recomputed map: {bins} bins x {samples} samples{' per digit' if per_class else ''}"
    new = UserSession(fisher=fm, fisher_note=note, evaluations=as_user(user).evaluations)
    return new, f"{note}, in {fm.meta['seconds']:.1f}s. Only your plans use it; other users keep theirs."


def shipped(state: AppState, user: UserSession | None) -> tuple[UserSession, str]:
    """Drop the user's recomputed map: their plans follow the shipped map again."""
    return (UserSession(evaluations=as_user(user).evaluations),
            f"back to the shipped map ({state.fisher_note})")


def bin_slider_update(state: AppState, user):
    """Range of the timestep-bin slider for the user's map (a 1-bin map has a fixed slider: Gradio needs max > min)."""
    nb = state.fisher_of(user).bins - 1
    return dict(minimum=0, maximum=max(nb, 1), value=0, interactive=nb > 0)


def build(state: AppState, user, guard):
    import gradio as gr

    from .components import Choice, RadioChoice

    from . import serving

    fm = state.fisher
    gr.Markdown(HOW_TO, elem_id="howto-fisher")
    gr.Markdown(f"Empirical Fisher of the denoising loss (mean of squared per-sample gradients). {state.fisher_note}.")
    with gr.Row():
        view = RadioChoice(list(VIEWS), value="log", label="view")
        level = RadioChoice(["layers", "tensors"], value="layers", label="rows")
        group = Choice(GROUPS, value="all", label="class")
    heat = gr.Plot()
    with gr.Row():
        layer = Choice(fm.layer_names(), value="down1", label="layer (bar chart)")
        t_bin = gr.Slider(0, fm.bins - 1, value=0, step=1, label="timestep bin (0 = the final denoising steps)")
    with gr.Row():
        bar = gr.Plot()
        mag = gr.Plot()
    with gr.Accordion("Recompute the Fisher map (yours only)", open=False):
        with gr.Row():
            bins = gr.Slider(1, MAX_BINS, value=fm.bins, step=1, label="timestep bins")
            samples = gr.Slider(1, MAX_FISHER_SAMPLES, value=16, step=1, label="samples per bin")
            per_class = gr.Checkbox(False, label="per digit (10x the work)")
        with gr.Row():
            go_btn = gr.Button("Recompute", elem_id="recompute")
            cancel = gr.Button("Cancel", elem_id="recompute-cancel")
            back = gr.Button("Back to the shipped map")
        status = gr.Markdown(elem_id="fisher-status")
    inputs = [view, group, level, t_bin, layer, user]
    outputs = [heat, mag, bar]

    def figures(*vals):
        return fisher_figures(state, *vals)
    for c in inputs[:-1]:
        c.change(guard(figures), inputs, outputs, trigger_mode="always_last", concurrency_id="readout",
                 show_progress="hidden", api_visibility="undocumented")

    # Annotations are evaluated here (no `from __future__ import annotations` in this module) so that
    # gradio recognises gr.Request and passes the session.
    def run(b, s, pc, usr, request: gr.Request, progress=gr.Progress()):
        fisher_settings(b, s)  # bad settings fail at once, not after waiting for the heavy slot
        progress(0, desc="waiting for other jobs")
        with state.job(request.session_hash, serving.event_alive(), heavy=True) as job:
            new, msg = recompute(state, b, s, pc, progress, cancel=job, user=usr)
        return new, msg, gr.Slider(**bin_slider_update(state, new))
    ev = go_btn.click(guard(run), [bins, samples, per_class, user], [user, status, t_bin], api_name="recompute_fisher",
                      concurrency_id="heavy", concurrency_limit=1)
    ev.then(guard(figures), inputs, outputs, api_visibility="private")

    def stop(request: gr.Request):
        if state.jobs.cancel(request.session_hash):
            return "Cancelled: the recompute stops at its next bin; your map is unchanged."
        return "Nothing to cancel."
    cancel.click(stop, None, status, cancels=[ev], api_visibility="private")

    def back_to_shipped(usr):
        new, msg = shipped(state, usr)
        return new, msg, gr.Slider(**bin_slider_update(state, new))
    back.click(guard(back_to_shipped), user, [user, status, t_bin], api_name="shipped_fisher").then(
        guard(figures), inputs, outputs, api_visibility="private")
    return figures, inputs, outputs
