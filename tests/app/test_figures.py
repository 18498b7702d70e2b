"""Every Plotly figure the app builds is readable without the source: a title, a title on each axis that shows
tick labels, and a hover template that names the quantity under the pointer. The page's theme script gives them
the dark layout in dark mode (the browser test checks it in Chromium)."""
import json
import re

import numpy as np
import plotly.graph_objects as go

from demo import plots, tab_compare, tab_fisher, tab_inside, tab_quality, tab_quantize
from demo.state import FIDPoint, UserSession
from demo.ui import LAUNCH_OPTIONS


def app_figures(app_state, tiny=None) -> dict[str, go.Figure]:
    """Each figure the tabs build, from their handlers, for the MNIST U-Net (and another model's where given)."""
    cur = tab_quantize.preset_current(app_state)
    figs = {}
    for level in ("layers", "tensors"):
        heat, mag, bar = tab_fisher.fisher_figures(app_state, "log", "all", level, 1, "down1")
        figs.update({f"fisher heatmap ({level})": heat, "weight magnitude": mag, "Fisher per tensor": bar})
    figs["quantize plan"] = tab_quantize.readout(app_state, cur)[2]
    figs["compare |Δ|"] = tab_compare.compare(app_state, cur, "3", 1.5, 2, 0, 1, True)[3]
    point = FIDPoint("a plan", 100, 20.0, 30.0, 1.0, "classifier", 200, 20, 2, model=app_state.model_id)
    figs["quality chart"] = tab_quality.pareto_figure(app_state, UserSession(evaluations=(point,)), 200, 20)
    figs["quality chart, empty"] = tab_quality.pareto_figure(app_state, None, 200, 20)
    figs["sensitivity"] = tab_quality.sensitivity_figure("fisher_x_error")
    heat, maps = tab_inside.activations(app_state, "3", 3, 0, "mid")
    figs.update({"activations": heat, "activation maps": maps})
    figs["saliency"] = tab_inside.saliency_panels(app_state, "3", 500, 0)
    figs["quantization error"] = tab_inside.quant_error(app_state, cur, "3", 3, 0)
    figs["activation drift"] = tab_inside.drift(app_state, 4, 0)
    if tiny is not None:
        state, user = tiny
        figs["other model's plan"] = tab_quantize.readout(state, tab_quantize.preset_current(state), user)[2]
    return figs


PLACEHOLDER = re.compile(r"%\{[^}]*\}|<[^>]*>")


def problems(name: str, fig: go.Figure) -> list[str]:
    out = []
    title = fig.layout.title.text or ""
    if not title.strip():
        out.append(f"{name}: no title")
    layout = fig.to_plotly_json()["layout"]
    used = sorted({ref[0] + "axis" + ref[1:] for t in fig.data for ref in (t.xaxis or "x", t.yaxis or "y")})
    for key in used:  # the axes the traces are drawn on
        axis = layout.get(key, {})
        if axis.get("visible") is False or axis.get("showticklabels") is False:
            continue
        if not (axis.get("title") or {}).get("text"):
            out.append(f"{name}: {key} shows values but has no title")
    for trace in fig.data:
        template = trace.hovertemplate or ""
        words = re.findall(r"[A-Za-z|Δ‖]{2,}", PLACEHOLDER.sub(" ", template))
        if not words:
            out.append(f"{name}: a {trace.type} trace's hover names no quantity ({template!r})")
    return out


def test_every_figure_has_a_title_axis_titles_and_a_hover_that_names_its_quantity(app_state, models):
    tiny_user = models.select(UserSession(), models.ids[1])
    figs = app_figures(app_state, (models.state_for(tiny_user), tiny_user))
    found = [p for name, fig in figs.items() for p in problems(name, fig)]
    assert not found, "\n".join(found)
    assert len(figs) >= 14


def test_the_audit_catches_a_figure_without_titles_or_a_named_hover():
    bare = go.Figure(go.Scatter(x=[1, 2], y=[3, 4], hovertemplate="%{x}, %{y}<extra></extra>"))
    assert problems("bare", bare) == ["bare: no title", "bare: xaxis shows values but has no title",
                                      "bare: yaxis shows values but has no title",
                                      "bare: a scatter trace's hover names no quantity ('%{x}, %{y}<extra></extra>')"]
    bare.update_layout(title="t", xaxis_title="size")
    assert problems("bare", bare)[0] == "bare: yaxis shows values but has no title"


def test_long_titles_wrap_for_a_phone_and_time_axes_keep_at_least_four_ticks():
    fig = plots.heatmap(["a", "b"], list(range(5, 1000, 10)), np.ones((2, 100)), "x " * 60, "c")
    lines = fig.layout.title.text.split("<br>")
    assert len(lines) > 1 and all(len(line) <= plots.TITLE_CHARS for line in lines)
    assert 4 <= len(fig.layout.xaxis.tickvals) <= 6
    assert fig.data[0].colorbar.thickness <= 12  # Plotly's default 30 px took ~40% of a phone-wide heatmap
    assert len(plots.time_ticks([10, 20, 30]).get("tickvals")) == 3


def test_the_page_script_switches_every_figure_to_the_dark_layout_in_dark_mode():
    """The script in the page's <head> carries Plotly's dark template with transparent backgrounds, keyed on
    Gradio's `dark` class; figures come from the server light and are re-laid out there."""
    head = LAUNCH_OPTIONS["head"]
    assert head.startswith("<script>") and 'classList.contains("dark")' in head
    dark = json.loads(re.search(r"dark: (\{.*?\}), light:", head, re.S).group(1))
    assert dark["meta"] == {"lafq_theme": "dark"}
    assert dark["template"]["layout"]["paper_bgcolor"] == "rgba(0,0,0,0)"
    assert dark["template"]["layout"]["font"]["color"] == "#f2f5fa"  # plotly_dark's light text
    fig = plots.bars(["a"], [1.0], "t", "y")
    assert fig.layout.template.layout.paper_bgcolor == "white"  # built light: the page decides
