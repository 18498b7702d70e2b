"""Inside tab: activations over the trajectory, saliency at a timestep, where quantization error grows, and how
far each layer's activation range drifts over the timesteps (why W8A8 scales are calibrated per timestep bin).

Every model: lafq.inside observes the selected model's own layers (lafq.layers). The saliency image is one of the
model's reference images (held out from training) where that split is on the machine, else one of its training
dataset (or that one's vendored subset: the Fashion model without Debian's dataset); the panel names which. The
layer control lists the selected model's layers with spatial maps (`spatial_layers`, probed once per model)."""
from __future__ import annotations

import torch

from lafq.inside import activation_drift, activation_trace, quantization_error_trace, saliency

from . import plots
from .state import MAX_STEPS, AppState, InputError, as_choice, as_number
from .tab_compare import class_choices, default_class
from .tab_quantize import current_label, preset_current, resolve_plan
from .zerogpu import gpu


def _common(state: AppState, cls, steps, seed):
    return (state.label(cls), as_number(steps, "DDIM steps", 2, MAX_STEPS, integer=True),
            as_number(seed, "seed", 0, 2**31 - 1, integer=True))


def spatial_layers(state: AppState) -> list[str]:
    """The selected model's layers that have spatial maps (channel maps, or a DiT's patch grid), in flow order;
    computed once per model."""
    steps = min(2, state.schedule.T)
    return state.memo("inside-layers", lambda: list(activation_trace(state.den, None, steps=steps, guidance=1.0).maps))


def default_layer(state: AppState) -> str | None:
    """The layer shown first: the second with spatial maps (the U-Net's `down1`: past the input convolution)."""
    layers = spatial_layers(state)
    return layers[min(1, len(layers) - 1)] if layers else None


def _class_name(state: AppState, label) -> str:
    return "any" if label is None else state.classes[label]


@gpu(duration=30)
def activations(state: AppState, cls, steps, seed, layer):
    label, steps, seed = _common(state, cls, steps, seed)
    layer = as_choice(layer, "layer", spatial_layers(state))
    tr = activation_trace(state.den, label, steps=steps, seed=seed, guidance=state.default_guidance)
    heat = plots.heatmap(tr.layers, tr.timesteps, torch.log10(tr.matrix.clamp_min(1e-12)).numpy(),
                         f"log10 mean |activation| per layer along one trajectory ({state.class_word} "
                         f"{_class_name(state, label)})", "log10 |a|")
    picks = sorted({round(i * (steps - 1) / 4) for i in range(5)})
    maps = plots.image_panels([tr.maps[layer][i].numpy() for i in picks] + [tr.image.mean(0).numpy()],
                              [f"{layer} t={tr.timesteps[i]}" for i in picks] + ["sample"],
                              f"mean |activation| of {layer} over the channels, along the trajectory", colorscale="Viridis")
    return heat, maps


def _saliency_images(state: AppState):
    """(images, labels, name): the model's reference split (held out from training) where it is on this machine,
    else its training dataset (or that one's vendored subset)."""
    from lafq.data import DataError, load_dataset_or_subset

    names = list(dict.fromkeys([state.reference, state.floor_images]))  # `reference` refuses a card naming none
    for name in names:
        try:
            data = load_dataset_or_subset(name)  # its vendored subset where the full split is not installed
            return (*data.tensors(), data.name)
        except DataError:
            continue
    raise InputError(f"no images for a saliency map: {' and '.join(names)} are not on this machine")


@gpu(duration=30)
def saliency_panels(state: AppState, cls, t, seed):
    label = state.label(cls)
    t = as_number(t, "timestep", 0, state.schedule.T - 1, integer=True)
    seed = as_number(seed, "seed", 0, 2**31 - 1, integer=True)
    x, y, name = _saliency_images(state)
    if tuple(x.shape[1:]) != state.den.sample_shape:
        raise InputError(f"{name} images are {tuple(x.shape[1:])}; {state.title} samples "
                         f"{state.den.sample_shape}: no saliency image")
    idx = (y == (label if label is not None else 0)).nonzero().flatten()
    if not len(idx):
        raise InputError(f"{name} has no image of {state.class_word} {_class_name(state, label)}")
    image = x[int(idx[seed % len(idx)])]
    r = saliency(state.den, image, label, t, seed=seed)
    return plots.image_panels([image.mean(0).numpy(), r["x_t"].numpy(), r["x0_hat"].numpy(), r["saliency"].numpy()],
                              [f"real x0 ({name})", f"x_t (t={t})", "model's x0 estimate", "saliency |dL/dx_t|"],
                              f"saliency at t={t}: which pixels of the noisy input move the loss")


@gpu(duration=30)
def quant_error(state: AppState, current: dict, cls, steps, seed, user=None):
    label, steps, seed = _common(state, cls, steps, seed)
    plan = resolve_plan(state, current, user)
    tr = quantization_error_trace(state.den, state.denoiser(state.quantized(plan)), label, steps=steps, seed=seed,
                                  guidance=state.default_guidance)
    return plots.heatmap(tr.layers, tr.timesteps, tr.matrix.numpy(),
                         f"relative error of each layer's output, {current_label(current, plan)} vs FP32 (same inputs)",
                         "‖q−f‖/‖f‖")


# Drift view: 8 samples (the model's classes in turn) and at most 10 bins; on the 2-core CPU about 1 s for the
# MNIST U-Net at DDIM-25.
DRIFT_SAMPLES, DRIFT_BINS = 8, 10


@gpu(duration=30)
def drift(state: AppState, steps, seed):
    steps = as_number(steps, "DDIM steps", 2, MAX_STEPS, integer=True)
    seed = as_number(seed, "seed", 0, 2**31 - 1, integer=True)
    r = activation_drift(state.den, n=DRIFT_SAMPLES, steps=steps, bins=min(DRIFT_BINS, steps), seed=seed,
                         guidance=state.default_guidance)
    rel = r.relative_widths()
    layers = list(rel)
    ratio = torch.stack([rel[k] for k in layers])
    centres = [round((a + b) / 2) for a, b in zip(r.edges, r.edges[1:])]
    d = r.drift()
    worst = max(d, key=d.get)
    return plots.heatmap(layers, centres, ratio.numpy(),
                         f"input range (max − min) of each weight layer per timestep bin, over its narrowest bin "
                         f"({DRIFT_SAMPLES} samples, DDIM-{steps}): up to {d[worst]:.1f}× ({worst}), what one "
                         f"static int8 scale would have to span; W8A8 calibrates one per bin",
                         "range / narrowest", x_title="timestep (bin centre)")


def saliency_t(state: AppState) -> int:
    """The saliency timestep shown first: 30% of the way into the noise (300 of 1,000)."""
    return round(0.3 * state.schedule.T)


EXAMPLE_STEPS = 25


def example(state: AppState):
    """Every view for the model's default controls (the default plan's error): computed once per model and kept.
    A model switch shows it only once computed (`shown_example`); selecting the tab computes it."""
    cls, layer, steps = default_class(state), default_layer(state), min(EXAMPLE_STEPS, state.schedule.T)

    def views():
        try:
            sal = saliency_panels(state, cls, saliency_t(state), 0)
        except InputError:  # no reference images of this model's shape: its button says why when pressed
            sal = None
        heat, maps = activations(state, cls, steps, 0, layer) if layer is not None else (None, None)
        return heat, maps, sal, quant_error(state, preset_current(state), cls, steps, 0)
    return state.memo("inside-example", views)


def shown_example(state: AppState):
    """The model's example views if they are computed already, else empty figures (a switch must not wait)."""
    return state.memoized("inside-example") or (None, None, None, None)


HOW_TO = ("**How to:** press a button to look inside the network along one denoising trajectory: which layers are "
          "active when, what the model attends to (saliency), where your plan's quantization error grows, and how far "
          "each layer's activation range drifts over the timesteps (why W8A8 calibrates its scales per timestep bin).")


def build(models, current, user, guard):
    """The tab for a demo.models.Registry. Returns (arrival, (refresh, its inputs, its outputs))."""
    import gradio as gr

    from .components import Choice

    state = models.default
    gr.Markdown(HOW_TO, elem_id="howto-inside")
    with gr.Row():
        cls = Choice(class_choices(state), value=default_class(state), label=state.class_word, elem_id="inside-class")
        steps = gr.Slider(2, 100, value=25, step=1, label="DDIM steps")
        seed = gr.Number(0, precision=0, label="seed")
        layer = Choice(spatial_layers(state), value=default_layer(state), label="layer for spatial maps",
                       elem_id="inside-layer")
    act_btn = gr.Button("Activations along the trajectory")
    heat = gr.Plot(show_label=False, elem_id="inside-activations")
    maps = gr.Plot(show_label=False)
    with gr.Row():
        # A number box, not a slider: a typed value out of range is refused with the range, never cut to it.
        t = gr.Number(saliency_t(state), precision=0, label="saliency timestep", info=f"0 to {state.schedule.T - 1}",
                      elem_id="saliency-t")
        sal_btn = gr.Button("Saliency map")
    sal = gr.Plot(show_label=False)
    qerr_btn = gr.Button("Quantization error along the trajectory (current plan)")
    qerr = gr.Plot(show_label=False)
    drift_btn = gr.Button("Activation ranges over the timesteps (W8A8 calibration)")
    drift_plot = gr.Plot(show_label=False, elem_id="inside-drift")

    arrival = (lambda: example(state)), [heat, maps, sal, qerr]
    act_btn.click(guard(lambda *v: activations(models.state_for(v[-1]), *v[:-1])), [cls, steps, seed, layer, user],
                  [heat, maps], api_name="activations", concurrency_id="sample", concurrency_limit=2)
    sal_btn.click(guard(lambda *v: saliency_panels(models.state_for(v[-1]), *v[:-1])), [cls, t, seed, user], sal,
                  api_name="saliency", concurrency_id="sample")
    qerr_btn.click(guard(lambda cur, *v: quant_error(models.state_for(v[-1]), cur, *v)),
                   [current, cls, steps, seed, user], qerr, api_name="quant_error", concurrency_id="sample")
    drift_btn.click(guard(lambda *v: drift(models.state_for(v[-1]), *v[:-1])), [steps, seed, user], drift_plot,
                    api_name="activation_drift", concurrency_id="sample")

    def refresh(usr):  # on a model switch: the controls, and the example views only if already computed
        st = models.state_for(usr)
        return (gr.Dropdown(choices=class_choices(st), value=default_class(st), label=st.class_word),
                gr.Dropdown(choices=spatial_layers(st), value=default_layer(st)),
                gr.Number(value=saliency_t(st), info=f"0 to {st.schedule.T - 1}"), *shown_example(st),
                None)  # the drift view is the previous model's: cleared
    show = (lambda usr: example(models.state_for(usr))), [user], [heat, maps, sal, qerr]  # when the tab is selected
    return arrival, (refresh, [user], [cls, layer, t, heat, maps, sal, qerr, drift_plot]), show
