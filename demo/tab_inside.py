"""Inside tab: activations over the trajectory, saliency at a timestep, where quantization error grows.

The MNIST U-Net only (lafq.inside observes its named layers and uses MNIST images): for another selected
model the tab says so and its buttons answer with that one line (an InputError)."""
from __future__ import annotations

import torch

from lafq.inside import OBSERVED, activation_trace, quantization_error_trace, saliency

from . import plots
from .state import MAX_STEPS, AppState, InputError, as_choice, as_number, digit_or_none
from .tab_quantize import current_label, preset_current, resolve_plan
from .zerogpu import gpu


ONLY = "the Inside tab works on the MNIST U-Net only: choose it in the model selector at the top"


def mnist_only(state: AppState) -> None:
    if not state.has_inside:
        raise InputError(ONLY)


def model_note(state: AppState) -> str:
    return "" if state.has_inside else f"**MNIST U-Net only.** {state.title} is selected; {ONLY}."


def _common(digit, steps, seed):
    return (digit_or_none(digit), as_number(steps, "DDIM steps", 2, MAX_STEPS, integer=True),
            as_number(seed, "seed", 0, 2**31 - 1, integer=True))


@gpu(duration=30)
def activations(state: AppState, digit, steps, seed, layer):
    mnist_only(state)
    label, steps, seed = _common(digit, steps, seed)
    layer = as_choice(layer, "layer", OBSERVED)
    tr = activation_trace(state.model, label, steps=steps, seed=seed, schedule=state.schedule)
    heat = plots.heatmap(tr.layers, tr.timesteps, torch.log10(tr.matrix.clamp_min(1e-12)).numpy(),
                         f"log10 mean |activation| per layer along one trajectory (digit {digit})", "log10 |a|")
    picks = sorted({round(i * (steps - 1) / 4) for i in range(5)})
    maps = plots.image_panels([tr.maps[layer][i].numpy() for i in picks] + [tr.image[0].numpy()],
                              [f"{layer} t={tr.timesteps[i]}" for i in picks] + ["sample"],
                              f"mean |activation| of {layer} over the channels, along the trajectory", colorscale="Viridis")
    return heat, maps


@gpu(duration=30)
def saliency_panels(state: AppState, digit, t, seed):
    mnist_only(state)
    label = digit_or_none(digit)
    t = as_number(t, "timestep", 0, state.schedule.T - 1, integer=True)
    seed = as_number(seed, "seed", 0, 2**31 - 1, integer=True)
    from lafq.data import load_dataset

    d = load_dataset("mnist-train5k")  # held-out images: not seen in training
    idx = int(((torch.from_numpy(d.labels) == (label if label is not None else 0)).nonzero()[seed % 500]).item())
    image = torch.from_numpy(d.images[idx]).float().div(127.5).sub(1)[None]
    r = saliency(state.model, image, label, t, seed=seed, schedule=state.schedule)
    return plots.image_panels([image[0].numpy(), r["x_t"].numpy(), r["x0_hat"].numpy(), r["saliency"].numpy()],
                              ["real x0", f"x_t (t={t})", "model's x0 estimate", "saliency |dL/dx_t|"],
                              f"saliency at t={t}: which pixels of the noisy input move the loss")


@gpu(duration=30)
def quant_error(state: AppState, current: dict, digit, steps, seed, user=None):
    mnist_only(state)
    label, steps, seed = _common(digit, steps, seed)
    plan = resolve_plan(state, current, user)
    tr = quantization_error_trace(state.model, state.quantized(plan), label, steps=steps, seed=seed,
                                  schedule=state.schedule)
    return plots.heatmap(tr.layers, tr.timesteps, tr.matrix.numpy(),
                         f"relative error of each layer's output, {current_label(current, plan)} vs FP32 (same inputs)",
                         "‖q−f‖/‖f‖")


HOW_TO = ("**How to:** press a button to look inside the network along one denoising trajectory: which layers are "
          "active when, what the model attends to (saliency), and where your plan's quantization error grows.")


def build(models, current, user, guard):
    """The tab for a demo.models.Registry. Returns (arrival, (refresh, its inputs, its outputs))."""
    import gradio as gr

    from .components import Choice

    state = models.default
    gr.Markdown(HOW_TO, elem_id="howto-inside")
    note = gr.Markdown(model_note(state), elem_id="inside-note")
    with gr.Row():
        digit = Choice(["any"] + [str(d) for d in range(10)], value="3", label="digit")
        steps = gr.Slider(2, 100, value=25, step=1, label="DDIM steps")
        seed = gr.Number(0, precision=0, label="seed")
        layer = Choice(OBSERVED, value="down1", label="layer for spatial maps")
    act_btn = gr.Button("Activations along the trajectory")
    heat = gr.Plot(show_label=False)
    maps = gr.Plot(show_label=False)
    with gr.Row():
        # A number box, not a slider: a typed value out of range is refused with the range, never cut to it.
        t = gr.Number(300, precision=0, label="saliency timestep", info=f"0 to {state.schedule.T - 1}",
                      elem_id="saliency-t")
        sal_btn = gr.Button("Saliency map")
    sal = gr.Plot(show_label=False)
    qerr_btn = gr.Button("Quantization error along the trajectory (current plan)")
    qerr = gr.Plot(show_label=False)

    def example():  # on arrival: every view for the default controls (the default plan's error), computed once
        return state.memo("inside-example", lambda: (  # per process and kept
            *activations(state, "3", 25, 0, "down1"), saliency_panels(state, "3", 300, 0),
            quant_error(state, preset_current(state), "3", 25, 0)))
    arrival = example, [heat, maps, sal, qerr]
    act_btn.click(guard(lambda *v: activations(models.state_for(v[-1]), *v[:-1])), [digit, steps, seed, layer, user],
                  [heat, maps], api_name="activations", concurrency_id="sample", concurrency_limit=2)
    sal_btn.click(guard(lambda *v: saliency_panels(models.state_for(v[-1]), *v[:-1])), [digit, t, seed, user], sal,
                  api_name="saliency", concurrency_id="sample")
    qerr_btn.click(guard(lambda cur, *v: quant_error(models.state_for(v[-1]), cur, *v)),
                   [current, digit, steps, seed, user], qerr, api_name="quant_error", concurrency_id="sample")

    def refresh(usr):
        st = models.state_for(usr)
        figs = example() if st.has_inside else (None, None, None, None)
        return (model_note(st), *figs)
    return arrival, (refresh, [user], [note, heat, maps, sal, qerr])
