"""Fisher tab: where the loss is sensitive, by layer or weight tensor, over timesteps.

A recompute runs on a private copy of the FP32 model (its hooks never touch the model other users
sample from) and its map becomes the requesting user's own (UserSession.fisher): other users' maps
and plans do not change, and "Back to the shipped map" undoes it. A failed or cancelled recompute
changes nothing.
"""

from dataclasses import replace

import torch

from lafq.fisher import VIEWS, FisherMap

from . import plots
from .state import (MAX_BINS, MAX_FISHER_SAMPLES, AppState, InputError, UserSession, as_choice, as_number, as_user,
                    Stages, cancellable, duration)
from .zerogpu import fisher_seconds, gpu

COLORBAR = {"raw": "E[(dL/dθ)²]", "normalized": "F / max F", "log": "log10(F / max F)"}
GROUPS = ["all"] + [str(d) for d in range(10)]
HOW_TO = ("**How to read it:** the heatmap shows where the denoising loss is most sensitive to each layer's weights "
          "at each timestep (bright = sensitive: keep it precise). The plans in **Quantize** are built from it.")


def group_choices(state: AppState) -> list[str]:
    """'all', then one per class (the MNIST U-Net: GROUPS)."""
    return ["all"] + [str(i) for i in range(len(state.classes))]


def layer_rows(state: AppState, fm: FisherMap | None, names: list[str] | None = None) -> list[tuple[str, list[int]]]:
    """(layer, indices of its tensors in `names`, by default the map's) in network order: the U-Net's layers
    as lafq orders them; another model's grouped by `state.layer_key` in parameter order."""
    names = list(fm.names) if names is None else list(names)
    keys = dict.fromkeys(state.layer_key(n) for n in names)
    order = [layer for layer in state.layers.order if layer in keys] + [k for k in keys if k not in state.layers.order]
    by = {}
    for i, n in enumerate(names):
        by.setdefault(state.layer_key(n), []).append(i)
    return [(layer, by[layer]) for layer in order]


def _weighted(values: torch.Tensor, numel: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Element-weighted mean over tensors idx (trace / numel of the layer), along the first axis."""
    w = numel[idx].to(values.dtype)
    return (values[idx] * w.reshape(-1, *[1] * (values.dim() - 1))).sum(0) / w.sum()


def _scaled(m: torch.Tensor, view: str) -> torch.Tensor:
    if view == "raw":
        return m
    norm = m / m.max().clamp_min(1e-300)
    return norm if view == "normalized" else torch.log10(norm.clamp_min(1e-12))


def fisher_figures(state: AppState, view: str, group: str, level: str, t_bin, layer: str, user=None):
    """Heatmap (layers or tensors × timestep), weight-magnitude bars, per-tensor bars inside one layer at one bin.
    A model without a Fisher map gets three figures that say so."""
    fm = state.fisher_of(user)
    view = as_choice(view, "view", VIEWS)
    level = as_choice(level, "level", ("layers", "tensors"))
    group = as_choice(str(group) if isinstance(group, (str, int)) else group, "class", group_choices(state))
    if fm is None:
        empty = plots.note(f"No Fisher map for {state.title}")
        return empty, empty, empty
    if group not in fm.groups:
        raise InputError(f"this Fisher map has no per-{state.class_word} maps (groups: {fm.groups}); "
                         f"recompute with 'per {state.class_word}' on")
    b = as_number(t_bin, "timestep bin", 0, fm.bins - 1, integer=True)
    rows_of = layer_rows(state, fm)
    layer = as_choice(layer, "layer", [name for name, _ in rows_of])
    g = fm.group_index(group)
    numel = torch.tensor(fm.numels, dtype=torch.float64)
    if level == "layers":
        rows, m = [name for name, _ in rows_of], torch.stack([_weighted(fm.fisher[g], numel, i) for _, i in rows_of])
    else:
        rows, m = fm.names, fm.fisher[g]
    cols = [int(c) for c in fm.bin_centers()]
    title = f"Fisher by {level[:-1]} and timestep ({view}; {state.class_word} {group})"
    heat = plots.heatmap(rows, cols, _scaled(m, view).numpy(), title, COLORBAR[view],
                         y_title="layer" if level == "layers" else "weight tensor",
                         mark=(layer, cols[b]) if level == "layers" else None)  # the cell the bar chart details
    mag = torch.stack([_weighted(fm.magnitude.double(), numel, i) for _, i in rows_of])
    mag_fig = plots.bars([name for name, _ in rows_of], mag.numpy(), "mean |w| per layer (weight magnitude)", "mean |w|")
    idx = dict(rows_of)[layer]
    raw = fm.fisher[g]
    lo, hi = fm.bin_edges[b], fm.bin_edges[b + 1] - 1
    bar = plots.bars([fm.names[i][len(layer) + 1:] for i in idx], raw[idx, b].numpy(),
                     f"Fisher per weight tensor in {layer}, t in [{lo}, {hi}]", "E[(dL/dθ)²]", log=True,
                     x_title="weight tensor")
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
    # `is not None`: gr.Progress() is falsy (its __len__ is 0 before any tracking), so `if progress` dropped it.
    report = Stages(progress, {"map": 1.0}, "Fisher").stage("map", lambda d, t: f"bin {d}/{t}")  # and the time left
    from .state import quick_fisher

    if state.fisher_dataset is None:
        raise InputError(f"{state.title} names no dataset (lafq.json \"dataset\"): its Fisher map cannot be "
                         "computed here")
    if per_class and not state.classes:
        raise InputError(f"{state.title} has no classes: untick 'per class'")
    model = state.private_model()  # the hooks go on a copy: the shared model keeps serving Compare, FID, Inside
    try:
        fm = quick_fisher(state.denoiser(model), state.fisher_dataset, bins, samples, per_class=bool(per_class),
                          progress=cancellable(report, cancel))
    finally:
        del model
    note = (f"your recomputed map: {bins} bins x {samples} samples{f' per {state.class_word}' if per_class else ''}"
            f" of {fm.meta['images']}")
    state._fisher_seconds = fm.meta["seconds"] / (bins * samples * (len(state.classes) if per_class else 1))
    new = replace(as_user(user), fisher=fm, fisher_note=note)
    return new, f"{note}, in {fm.meta['seconds']:.1f}s. Only your plans use it; other users keep theirs."


FISHER_STEP_FACTOR = 5.1  # one per-sample gradient costs about 5.1 image-steps of sampling (MNIST U-Net, 2 AMD
# EPYC cores: 24 ms against 4.8 ms): the estimate before a first recompute; later ones use the measured pace


def estimate(state: AppState, bins, samples, per_class) -> tuple[float, str]:
    """(seconds, a line) a recompute would take here: per-sample gradients × their measured (or derived) pace."""
    bins, samples = fisher_settings(bins, samples)
    gradients = bins * samples * (len(state.classes) if per_class else 1)
    pace = state._fisher_seconds or FISHER_STEP_FACTOR * state.seconds_per_image_step()
    seconds = gradients * pace
    return seconds, (f"This recompute takes {gradients:,} per-sample gradients: about **{duration(seconds)}** here. "
                     "Press **Start** to run it, or lower the bins or samples.")


def shipped(state: AppState, user: UserSession | None) -> tuple[UserSession, str]:
    """Drop the user's recomputed map: their plans follow the shipped map again."""
    return (replace(as_user(user), fisher=None, fisher_note=""),
            f"back to the shipped map ({state.fisher_note})")


def bin_slider_update(state: AppState, user):
    """Range of the timestep-bin slider for the user's map (a 1-bin map has a fixed slider: Gradio needs max > min)."""
    fm = state.fisher_of(user)
    nb = fm.bins - 1 if fm is not None else 0
    return dict(minimum=0, maximum=max(nb, 1), value=0, interactive=nb > 0)


def model_note(state: AppState, user=None) -> str:
    """The line under the how-to: what the map is and where it came from."""
    return (f"Empirical Fisher of the denoising loss (mean of squared per-sample gradients) of **{state.title}**. "
            f"{state.note_of(user)}.")


def _first_inner(state: AppState, layers: list[str]) -> str | None:
    """The layer shown first: the one after the model's input layer (the U-Net's down1), else the first."""
    first = state.layers.edges[0]
    if first in layers and layers.index(first) + 1 < len(layers):
        return layers[layers.index(first) + 1]
    return layers[0] if layers else None


def model_controls(state: AppState, user=None) -> dict:
    """Settings of the controls that depend on the selected model (its classes, layers, bins)."""
    fm = state.fisher_of(user)
    layers = [name for name, _ in layer_rows(state, fm)] if fm is not None else []
    return dict(groups=group_choices(state), layers=layers,
                layer=_first_inner(state, layers),
                bins=fm.bins if fm is not None else 10, per_class=bool(state.classes))


def build(models, user, guard):
    """The tab for a demo.models.Registry; every handler works on the model the user's session selected.
    Returns (figures, inputs, outputs, (refresh, its inputs, its outputs)): `refresh(user)` re-labels the
    model-dependent controls after a model switch."""
    import gradio as gr

    from .components import Choice, RadioChoice, disarm, two_press

    from . import serving

    state = models.default
    start = model_controls(state)
    gr.Markdown(HOW_TO, elem_id="howto-fisher")
    note = gr.Markdown(model_note(state), elem_id="fisher-note")
    with gr.Row():
        view = RadioChoice(list(VIEWS), value="log", label="view")
        level = RadioChoice(["layers", "tensors"], value="layers", label="rows")
        group = Choice(start["groups"], value="all", label="class")
    heat = gr.Plot(elem_id="fisher-heatmap", show_label=False)
    with gr.Row():
        layer = Choice(start["layers"], value=start["layer"], label="layer (bar chart)")
        t_bin = gr.Slider(0, start["bins"] - 1, value=0, step=1, label="timestep bin (0 = the final denoising steps)")
    with gr.Row():
        bar = gr.Plot(show_label=False)
        mag = gr.Plot(show_label=False)
    with gr.Accordion("Recompute the Fisher map (yours only)", open=False):
        with gr.Row():
            # A number box, not a slider: a typed value out of range is refused with the range, never cut to it.
            bins = gr.Number(start["bins"], precision=0, label="timestep bins", info=f"1 to {MAX_BINS}",
                             elem_id="fisher-bins")
            samples = gr.Slider(1, MAX_FISHER_SAMPLES, value=16, step=1, label="samples per bin")
            per_class = gr.Checkbox(False, label=f"per {state.class_word} ({len(state.classes)}x the work)"
                                    if state.classes else "per class (this model has none)", interactive=bool(state.classes))
        with gr.Row():
            go_btn = gr.Button("Recompute", elem_id="recompute")
            cancel = gr.Button("Cancel", elem_id="recompute-cancel")
            back = gr.Button("Back to the shipped map")
        status = gr.Markdown(elem_id="fisher-status")
    inputs = [view, group, level, t_bin, layer, user]
    outputs = [heat, mag, bar]

    def figures(*vals):
        return fisher_figures(models.state_for(vals[-1]), *vals)
    # One event for all the view controls (see tab_quantize: results of separate events can arrive out of
    # order). A refused value keeps the figures and says why in the status line: an error would also drop
    # the run Gradio deferred with the final values.
    def figures_inline(*vals):
        *vals, shown_status = vals
        return (*figures(*vals), "" if str(shown_status or "").startswith("⚠️") else gr.skip())
    gr.on([c.change for c in inputs[:-1]], guard(figures_inline, keep=len(outputs)), [*inputs, status],
          [*outputs, status], trigger_mode="always_last", concurrency_id="readout", show_progress="hidden",
          api_visibility="undocumented")

    # Annotations are evaluated here (no `from __future__ import annotations` in this module) so that
    # gradio recognises gr.Request and passes the session.
    def run(b, s, pc, usr, request: gr.Request, progress=gr.Progress()):
        fisher_settings(b, s)  # bad settings fail at once, not after waiting for the heavy slot
        st = models.state_for(usr)
        progress(0, desc="waiting for other jobs")
        with st.job(request.session_hash, serving.event_alive(), heavy=True, kind="recompute") as job:
            new, msg = recompute(st, b, s, pc, progress, cancel=job, user=usr)
        return new, msg, gr.Slider(**bin_slider_update(st, new)), model_note(st, new)
    api_btn = gr.Button("recompute (API)", visible=False)
    api_ev = api_btn.click(guard(run), [bins, samples, per_class, user], [user, status, t_bin, note],
                           api_name="recompute_fisher", concurrency_id="heavy", concurrency_limit=1)
    api_ev.then(guard(figures), inputs, outputs, api_visibility="private")

    # In the page: a recompute estimated over 30 s here shows its estimate and starts on a second press; a
    # refused setting keeps the map and says why beside the buttons (the status line).
    def run_page(b, s, pc, usr, request: gr.Request, progress=gr.Progress()):
        new, msg, slider, note_ = run(b, s, pc, usr, request, progress)
        return new, slider, note_, msg
    page = two_press(run_page, lambda b, s, pc, usr: estimate(models.state_for(usr), b, s, pc), "Recompute",
                     outputs=3, says=True)
    armed = gr.State(None)
    ev = go_btn.click(guard(page, keep=5), [bins, samples, per_class, user, armed],
                      [user, t_bin, note, armed, go_btn, status], concurrency_id="evaluate", concurrency_limit=16,
                      api_visibility="private", show_progress_on=[status])
    ev.success(guard(figures), inputs, outputs, api_visibility="private")
    gr.on([bins.input, samples.input, per_class.input], disarm("Recompute"), None, [armed, go_btn, status],
          queue=False, api_visibility="private")

    def stop(request: gr.Request):
        if state.jobs.cancel(request.session_hash, "recompute"):  # one job table for every model (demo.models)
            return "Cancelled: the recompute stops at its next bin; your map is unchanged."
        return "Nothing to cancel."
    cancel.click(stop, None, status, cancels=[ev, api_ev], api_visibility="private")

    def back_to_shipped(usr):
        st = models.state_for(usr)
        new, msg = shipped(st, usr)
        return new, msg, gr.Slider(**bin_slider_update(st, new)), model_note(st, new)
    back.click(guard(back_to_shipped), user, [user, status, t_bin, note], api_name="shipped_fisher").then(
        guard(figures), inputs, outputs, api_visibility="private")

    def refresh(usr):
        st = models.state_for(usr)
        c = model_controls(st, usr)
        word = st.class_word
        return (model_note(st, usr), gr.Dropdown(choices=c["groups"], value="all"),
                gr.Dropdown(choices=c["layers"], value=c["layer"]), gr.Slider(**bin_slider_update(st, usr)),
                gr.Number(value=c["bins"]), gr.Checkbox(value=False, interactive=c["per_class"],
                                                        label=f"per {word} ({len(st.classes)}x the work)"
                                                        if c["per_class"] else "per class (this model has none)"), "",
                *disarm("Recompute")()[:2])
    return figures, inputs, outputs, (refresh, [user], [note, group, layer, t_bin, bins, per_class, status, armed, go_btn])
