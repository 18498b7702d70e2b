"""Compare tab: FP32, the current plan and (optionally) uniform quantization from identical noise.

On arrival the tab shows an example (the default preset, budget 4.5 bits, beside uniform INT4 and FP32),
computed once per process and then served from memory to every page that opens.
"""
from __future__ import annotations

import numpy as np
import torch

from lafq.pipeline import SampleSpec
from lafq.policy import Plan
from lafq.precision import fallback

from . import plots
from .state import MAX_SAMPLES, MAX_STEPS, AppState, InputError, as_number, shown
from .tab_quantize import current_label, preset_current, resolve_plan
from .zerogpu import gpu

DEFAULTS = dict(steps=20, seed=0, n=4)  # the class and guidance are the model's own (its card)
HOW_TO = ("**How to:** pick what to draw and press Generate: FP32, your plan (from the Quantize tab) and uniform "
          "quantization at the plan's lowest precision start from the same noise, so any difference is the "
          "quantization's. Each image is labelled with its size.")
SPEED_NOTE = ("Size, not speed: the quantized weights are stored small (memory, download) and dequantized for "
              "FP32 compute, so each image takes about FP32's time here.")


def grid(images: torch.Tensor, nrow: int, scale: int = 3, pad_value: int | None = None) -> np.ndarray:
    """uint8 (n, C, H, W) -> one image, upscaled for the browser (small samples to at least 84 pixels a side).
    By default the padding between images is transparent (RGBA out), so the grid sits on the page's own colour
    in light and dark mode; with a `pad_value`, (H', W') for one channel and (H', W', 3) for three."""
    from torchvision.utils import make_grid

    scale = max(scale, -(-84 // max(1, images.shape[-1]))) if scale > 1 else scale
    if pad_value is None:
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        alpha = torch.full_like(rgb[:, :1], 255)
        g = make_grid(torch.cat([rgb, alpha], 1), nrow=nrow, padding=2, pad_value=0)
    else:
        g = make_grid(images, nrow=nrow, padding=2, pad_value=pad_value)
        if images.shape[1] == 1:
            return np.kron(g[0].numpy(), np.ones((scale, scale), dtype=np.uint8))
    return np.kron(g.permute(1, 2, 0).numpy(), np.ones((scale, scale, 1), dtype=np.uint8))


def uniform_plan(state: AppState, plan: Plan) -> Plan:
    """Every tensor at the lowest precision the current plan uses (fewest bits; the first registered among equals):
    the same-precision baseline."""
    from lafq.precision import BITS, PRECISIONS

    used = set(plan.precisions.values()) or {"fp32"}
    low = min(used, key=lambda p: (BITS[p], PRECISIONS.index(p)))
    return Plan({n: fallback(s, low) for n, s in state.shapes.items()}, {"strategy": "uniform", "target": low})


@gpu(duration=30)
def compare(state: AppState, current: dict, digit, guidance, steps, seed, n, with_uniform: bool, user=None):
    """Images from each model with the same seed; the |difference| map; seconds per image for each."""
    label = state.label(digit)
    spec = SampleSpec(n=as_number(n, "images", 1, MAX_SAMPLES, integer=True),
                      labels=() if label is None else (label,), steps=as_number(steps, "DDIM steps", 1, MAX_STEPS, integer=True),
                      guidance=as_number(guidance, "guidance", 0.0, 10.0),
                      seed=as_number(seed, "seed", 0, 2**31 - 1, integer=True), batch_size=64)
    if not isinstance(with_uniform, bool):
        raise InputError(f"'also uniform' must be true or false, got {shown(with_uniform)}")
    plan = resolve_plan(state, current, user)
    models = {"FP32": state.model, "plan": state.quantized(plan)}
    if with_uniform:
        u = uniform_plan(state, plan)
        models[f"uniform {u.policy['target']}"] = state.quantized(u)
    out = {name: state.sample(m, spec) for name, m in models.items()}
    nrow = max(1, int(round(spec.n ** 0.5)))
    # Per-run timings on a shared CPU varied 2-3x between identical runs: not shown (python -m lafq bench measures
    # speed with warm-up and paired repeats). Sizes and the mean |Δ| to FP32 are exact.
    diffs = {k: (v.float() - out["FP32"].float()).abs() for k, v in out.items() if k != "FP32"}
    panels = {k: grid(d.amax(1, keepdim=True).to(torch.uint8), nrow, scale=1, pad_value=0)  # colour images: the
              for k, d in diffs.items()}                                                 # largest channel difference
    diff_fig = plots.diff_map(panels, "|Δ| to FP32 per pixel (0-255)")
    sizes = {"plan": state.size(plan)}
    if with_uniform:
        sizes[f"uniform {u.policy['target']}"] = state.size(u)
    guided = state.guided
    md = (f"Plan: **{current_label(current, plan)}**. FP32 {_kb(sizes['plan'].fp32_bytes)} · "
          + " · ".join(f"**{k}** {_kb(r.total_bytes)} ({r.pct_of_fp32:.0f}% of FP32), mean |Δ| to FP32 "
                       f"{diffs[k].mean():.2f}/255" for k, r in sizes.items())
          + f" — {state.title}, DDIM-{spec.steps}, guidance {spec.guidance if guided else '1 (no null class)'}, "
            f"seed {spec.seed}.")
    md += f"\n\n{SPEED_NOTE}"
    images = [grid(out["FP32"], nrow), grid(out["plan"], nrow)]
    images.append(grid(out[next(k for k in out if k.startswith("uniform"))], nrow) if with_uniform else None)
    return (*images, diff_fig, md)


def example(state: AppState):
    """The arrival example (default preset vs uniform, same noise), computed once per process and kept."""
    guidance = state.default_guidance
    return state.memo("compare-example", lambda: compare(
        state, preset_current(state), default_class(state), guidance, DEFAULTS["steps"], DEFAULTS["seed"],
        DEFAULTS["n"], True))


def _kb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def strip(panels: list[np.ndarray], labels: list[str], gap: int = 12) -> np.ndarray:
    """Grids side by side, each under its label: one RGBA picture, so a phone scales it to its width instead of
    stacking three images below the fold. Transparent around the images (the page's colour shows, light or
    dark); the labels in a mid grey that reads on both (contrast about 4.5:1 on white and 4:1 on Gradio's dark)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(12, panels[0].shape[0] // 9))  # still legible scaled to a phone
    ims = [Image.fromarray(p).convert("RGBA") for p in panels]
    lines = max(label.count("\n") + 1 for label in labels)
    text_h = lines * (font.getbbox("Ag")[3] + 4) + 6
    width = sum(im.width for im in ims) + gap * (len(ims) - 1)
    out = Image.new("RGBA", (width, max(im.height for im in ims) + text_h), (0, 0, 0, 0))
    draw, x = ImageDraw.Draw(out), 0
    for im, label in zip(ims, labels):
        draw.multiline_text((x + 2, 2), label, fill=(118, 118, 118, 255), font=font, spacing=4)
        out.paste(im, (x, text_h))
        x += im.width + gap
    return np.asarray(out)


def hero(state: AppState) -> tuple[np.ndarray, str]:
    """The first screen for a model: its arrival example (FP32 · the default Fisher plan · uniform at the plan's
    lowest precision, same noise) as one labelled picture, with a line saying what it shows and what to do next.
    Computed once per model and process (state.memo), like the example."""
    fp32, plan_img, uniform_img, _diff, _md = example(state)  # its own memo (one lock: not inside another memo)

    def compute():
        fisher = state.fisher is not None
        labels, target = panel_labels(state, preset_current(state), plan_name="Fisher plan" if fisher else "plan",
                                      sep="\n")
        what = state.class_word if state.classes else "image"
        if not fisher:
            return strip([fp32, plan_img, uniform_img], labels), (
                f"**{state.title}**, one noise through FP32 and a quantized plan: this model has no Fisher map, so its "
                f"default plan is uniform {target}.  \n**Next:** build another plan in **Quantize**, then generate "
                f"with it in **Compare**.")
        line = (f"**{state.title}**, one noise through three models. Where the Fisher plan keeps the {what} and "
                f"uniform {target} at about the same size loses it, the Fisher map put the bits.  \n"
                f"**Next:** build your own plan in **Quantize**, then generate any {what} with it in **Compare**.")
        return strip([fp32, plan_img, uniform_img], labels), line
    return state.memo("hero", compute)


def class_choices(state: AppState) -> list[tuple[str, str]]:
    """The class control's (shown name, value) pairs: 'any' then each class by name."""
    return [("any", "any")] + [(name, str(i)) for i, name in enumerate(state.classes)]


def default_class(state: AppState) -> str:
    return state.default_class


def tagged(a: np.ndarray | None):
    """An image as a PNG-tagged PIL image, unique per response (see `served`)."""
    import uuid

    from PIL import Image

    if a is None:
        return None
    img = Image.fromarray(a)
    img.info["lafq-response"] = uuid.uuid4().hex
    return img


def panel_labels(state: AppState, current: dict, user=None, plan_name: str = "current plan",
                 sep: str = " · ") -> tuple[list[str], str]:
    """The three image labels (FP32, the plan, uniform at its lowest precision), each with its model's stored
    bytes and share of FP32; and that lowest precision's name."""
    plan = resolve_plan(state, current, user)
    u = uniform_plan(state, plan)
    size, usize, target = state.size(plan), state.size(u), u.policy["target"].upper()
    return [f"FP32{sep}{_kb(size.fp32_bytes)}", f"{plan_name}{sep}{_kb(size.total_bytes)} ({size.pct_of_fp32:.0f}%)",
            f"uniform {target}{sep}{_kb(usize.total_bytes)} ({usize.pct_of_fp32:.0f}%)"], target


def served(outputs, labels=None):
    """Compare's outputs with the three grids as PNG-tagged PIL images, unique per response. Gradio writes an
    image output in place, at a path named by the image's hash: two users receiving identical images at once
    (the same seed, the arrival example) could download a half-written file. A per-response tag gives each
    response its own file (Gradio deletes them after an hour)."""
    *images, diff_fig, md = outputs
    if labels is None:
        return (*[tagged(a) for a in images], diff_fig, md)
    import gradio as gr
    return (*[gr.Image(value=tagged(a), label=lab) for a, lab in zip(images, labels)], diff_fig, md)


def build(models, current, user, guard):
    """The tab for a demo.models.Registry. Returns (arrival example, outputs, (refresh, its inputs, its outputs)):
    `refresh(user)` sets the class control to the selected model's classes and clears the images."""
    import gradio as gr

    from .components import Choice

    state = models.default
    gr.Markdown(HOW_TO, elem_id="howto-compare")
    with gr.Row():
        digit = Choice(class_choices(state), value=default_class(state), label=state.class_word, elem_id="compare-class")
        guidance = gr.Slider(0, 6, value=state.default_guidance, step=0.1,
                             label="guidance scale", interactive=state.guided)
        steps = gr.Slider(1, MAX_STEPS, value=DEFAULTS["steps"], step=1, label="DDIM steps")
        seed = gr.Number(DEFAULTS["seed"], precision=0, label="seed")
        n = gr.Slider(1, 16, value=DEFAULTS["n"], step=1, label="images")
        with_uniform = gr.Checkbox(True, label="also uniform at the plan's lowest precision")
    go_btn = gr.Button("Generate", variant="primary", elem_id="generate")
    note = gr.Markdown(elem_id="compare-note")  # why a value was refused, beside the button; the last images stay
    with gr.Row():
        a = gr.Image(label="FP32", elem_id="img-fp32", format="png")
        b = gr.Image(label="current plan", elem_id="img-plan", format="png")
        c = gr.Image(label="uniform", elem_id="img-uniform", format="png")
    diff = gr.Plot(show_label=False)
    timing = gr.Markdown(elem_id="compare-timing")
    outputs = [a, b, c, diff, timing]

    def run(cur, *v):  # the API's answer: the images, as files
        return served(compare(models.state_for(v[-1]), cur, *v))

    def run_labelled(cur, *v):  # the page's: each image labelled with its bytes and share of FP32
        st = models.state_for(v[-1])
        labels, _ = panel_labels(st, cur, v[-1])
        if not v[-2]:  # no uniform column
            labels[2] = "uniform"
        return (*served(compare(st, cur, *v), labels), "")
    inputs = [current, digit, guidance, steps, seed, n, with_uniform, user]
    # In the page a refused value (a seed out of range) keeps the images and says why under them; the named
    # endpoint (a hidden button, as the API sees it) answers an API client with an error instead.
    go_btn.click(guard(run_labelled, keep=len(outputs)), inputs, [*outputs, note], concurrency_id="sample",
                 concurrency_limit=2, api_visibility="private")
    api_btn = gr.Button("compare (API)", visible=False)
    api_btn.click(guard(run), inputs, outputs, api_name="compare", concurrency_id="sample", concurrency_limit=2)

    def refresh(usr):
        st = models.state_for(usr)
        return (gr.Dropdown(choices=class_choices(st), value=default_class(st), label=st.class_word),
                gr.Slider(value=st.default_guidance, interactive=st.guided),
                *[gr.Image(value=None, label=lab) for lab in ("FP32", "current plan", "uniform")], None,
                f"**{st.title}** selected: press Generate.", "")
    return ((lambda: served(example(state), panel_labels(state, preset_current(state))[0])), outputs,
            (refresh, [user], [digit, guidance, *outputs, note]))
