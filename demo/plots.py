"""Plotly figures as pure functions of plain data: tests call them directly.

Readability rules: every figure has a title, a title on each visible axis and a hover template that
names the quantity under the pointer; log axes label decades as powers of ten (10⁻⁵, not "10μ") with no
minor-tick labels; titles wrap at TITLE_CHARS (a 390-px phone fits about 46 characters of a 14-px title);
heatmap colour bars are narrow and their time axes carry at least four ticks; image grids wrap at three panels.

Dark mode: the figures are built light (plotly_white); `theme_js()`, run in the page, re-lays out every figure
with Plotly's dark template while Gradio's page is dark (its <body> has the class `dark`) and back when it is not.
"""
from __future__ import annotations

import json
import textwrap

import numpy as np
import plotly.graph_objects as go

PRECISION_COLORS = {"fp32": "#1f77b4", "fp16": "#2ca02c", "bf16": "#17becf", "int8": "#ff7f0e", "int4": "#d62728",
                    "int4-g64": "#e377c2", "int4-g32": "#9467bd"}
LAYOUT = dict(margin=dict(l=10, r=10, t=60, b=10), template="plotly_white")
LOG_AXIS = dict(type="log", exponentformat="power", dtick=1, minor=dict(showgrid=False, ticks=""))
NUMBER_FORMAT = dict(exponentformat="power")  # colour bars and linear axes: 1e-5 as a power, never an SI prefix
TITLE_CHARS = 46
IMAGE_AXIS = dict(showticklabels=False, showgrid=False, zeroline=False)  # images: no ticks, no grid over them
COLORBAR = dict(thickness=10, **NUMBER_FORMAT)  # Plotly's default 30 px bar took ~40% of a phone-wide heatmap


def wrap(title: str, width: int = TITLE_CHARS) -> str:
    """A title in lines of at most `width` characters (Plotly cuts a long title at the figure's edge)."""
    return "<br>".join(textwrap.wrap(title, width)) or title


def _titled(fig: go.Figure, title: str, height: int, top: int = 34, **kw) -> go.Figure:
    """Layout with the wrapped title, the top margin grown by its lines."""
    text = wrap(title)
    lines = text.count("<br>") + 1
    layout = {**LAYOUT, "margin": {**LAYOUT["margin"], "t": top + 20 * lines}}
    fig.update_layout(title=dict(text=text, font=dict(size=14)), height=height + 20 * (lines - 1), **layout, **kw)
    return fig


def time_ticks(cols: list, at_least: int = 4, at_most: int = 6) -> dict:
    """Explicit ticks on a time axis: Plotly's automatic ones fell to two on a 390-px phone."""
    if len(cols) <= at_most:
        return dict(tickmode="array", tickvals=list(cols))
    step = max(1, -(-len(cols) // at_most))
    picks = list(cols[::step])
    if len(picks) < at_least:
        picks = list(cols[::max(1, len(cols) // at_least)])
    return dict(tickmode="array", tickvals=picks)


def _dark_layout() -> dict:
    import plotly.io as pio

    template = pio.templates["plotly_dark"].to_plotly_json()
    template["layout"].update(paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)")  # the page's own colour
    return {"template": template, "meta": {"lafq_theme": "dark"}}


def _light_layout() -> dict:
    import plotly.io as pio

    return {"template": pio.templates["plotly_white"].to_plotly_json(), "meta": {"lafq_theme": "light"}}


def theme_js() -> str:
    """A page script: each Plotly figure takes the dark layout while <body> has the class `dark` (Gradio's dark
    mode, from the system setting or ?__theme=dark), the light one otherwise. It re-checks whenever the page
    changes (a new figure, a new value: Gradio re-plots with the server's light layout), and a figure already
    in the page's theme is left alone, so its own re-layout does not start another."""
    return """
(() => {
  const LAYOUTS = {dark: %s, light: %s};
  function apply() {
    if (!window.Plotly) return;
    const want = document.body.classList.contains("dark") ? "dark" : "light";
    for (const gd of document.querySelectorAll(".js-plotly-plot")) {
      const have = (gd.layout && gd.layout.meta && gd.layout.meta.lafq_theme) || "light";
      if (have !== want) window.Plotly.relayout(gd, LAYOUTS[want]);
    }
  }
  let queued = false;
  const schedule = () => { if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; apply(); }); } };
  const start = () => new MutationObserver(schedule).observe(document.body,
      {childList: true, subtree: true, attributes: true, attributeFilter: ["class"]});
  if (document.body) start(); else document.addEventListener("DOMContentLoaded", start);
})();
""" % (json.dumps(_dark_layout()), json.dumps(_light_layout()))


def heatmap(rows: list[str], cols: list, z, title: str, colorbar: str, x_title: str = "timestep",
            y_title: str = "layer", mark: tuple | None = None) -> go.Figure:
    """rows × cols of z (the colour bar titled `colorbar`, which the hover names too); `mark` = (row, col) outlines
    one cell (the one another chart details)."""
    z = np.asarray(z, dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=rows, colorscale="Viridis",
                               colorbar=dict(title=dict(text=colorbar, side="right"), **COLORBAR),
                               hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>{colorbar} %{{z:.3g}}<extra></extra>"))
    dense = len(rows) >= 40  # tensor rows: 12 px each and small labels (22 px made a 3,000-px figure)
    _titled(fig, title, max(320, (12 if dense else 22) * len(rows) + 120))
    fig.update_xaxes(title=x_title, **time_ticks(list(cols)))
    fig.update_yaxes(title=y_title, autorange="reversed", tickfont=dict(size=10 if not dense else 8), automargin=True)
    if mark is not None and mark[0] in rows and mark[1] in cols:
        r, c, xs = rows.index(mark[0]), list(cols).index(mark[1]), list(cols)
        half = (xs[1] - xs[0]) / 2 if len(xs) > 1 else 0.5
        fig.add_shape(type="rect", x0=xs[c] - half, x1=xs[c] + half, y0=r - 0.5, y1=r + 0.5,
                      line=dict(color="#ff3b30", width=2))
    return fig


def bars(names: list[str], values, title: str, y_title: str, log: bool = False, colors=None,
         x_title: str = "layer") -> go.Figure:
    fig = go.Figure(go.Bar(x=names, y=np.asarray(values, dtype=float), marker_color=colors,
                           hovertemplate=f"{x_title} %{{x}}<br>{y_title} %{{y:.3g}}<extra></extra>"))
    _titled(fig, title, 360)
    fig.update_yaxes(title=y_title, **(LOG_AXIS if log else NUMBER_FORMAT))
    fig.update_xaxes(title=x_title, tickangle=-45, tickfont=dict(size=9))
    return fig


def plan_by_layer(layers: list[str], signal: list[float] | None, signal_title: str,
                  params: dict[str, list[int]], title: str) -> go.Figure:
    """The plan layer by layer beside the Fisher signal that chose it, rows in the heatmap's order: left, the
    layer's Fisher score (log); right, its weights by precision (stacked shares of the layer's parameters).
    `params`: precision -> parameters at that precision in each layer. Without a signal, the plan alone."""
    from plotly.subplots import make_subplots

    total = np.maximum(1, np.sum([np.asarray(v, dtype=float) for v in params.values()], axis=0))
    left = signal is not None
    fig = make_subplots(rows=1, cols=2 if left else 1, shared_yaxes=True, horizontal_spacing=0.03,
                        column_widths=[0.35, 0.65] if left else None)
    col = 2 if left else 1
    if left:
        fig.add_trace(go.Bar(y=layers, x=np.asarray(signal, dtype=float), orientation="h", marker_color="#7f7f7f",
                             showlegend=False, name="Fisher",
                             hovertemplate=f"layer %{{y}}<br>{signal_title} %{{x:.3g}}<extra></extra>"), 1, 1)
        fig.update_xaxes(title=signal_title, row=1, col=1, **{**LOG_AXIS, "dtick": 2}, tickangle=0)  # a narrow
        # panel: every other decade, upright (every decade turned sideways and ran into the titles on a phone)
    for p in params:  # every precision in the registry (lafq.precision.FORMATS), in its order
        color = PRECISION_COLORS.get(p, "#8c564b")
        counts = np.asarray(params.get(p, [0] * len(layers)), dtype=float)
        if counts.any():
            fig.add_trace(go.Bar(y=layers, x=100 * counts / total, orientation="h", name=p, marker_color=color,
                                 customdata=counts,
                                 hovertemplate="layer %{y}<br>" + p + ": %{x:.0f}% of its weights "
                                               "(%{customdata:,} parameters)<extra></extra>"), 1, col)
    fig.update_xaxes(title="% of weights", range=[0, 100], row=1, col=col)
    fig.update_yaxes(title="layer", autorange="reversed", automargin=True, tickfont=dict(size=10), row=1, col=1)
    _titled(fig, title, max(320, 20 * len(layers) + 170), barmode="stack", bargap=0.15,
            legend=dict(orientation="h", yanchor="top", y=-0.22, x=0, title_text="precision"))
    fig.update_layout(margin=dict(b=120))  # the legend under the axis titles
    return fig


def pareto(panels: dict[str, list[dict]], title: str) -> go.Figure:
    """Size against FID, one panel per setting ({panel title: points}; points: {label, pct_of_fp32, fid_mean,
    fid_ci95, fp32: bool}): FIDs at different N and steps are on different scales, so each setting has its own
    axes. An empty panel says how to fill it."""
    from plotly.subplots import make_subplots

    names = list(panels)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[wrap(n, 40) for n in names], horizontal_spacing=0.12)
    for i, name in enumerate(names, start=1):
        pts = panels[name]
        for fp32, (color, symbol, size) in ((True, ("#1f77b4", "star", 14)), (False, ("#d62728", "diamond", 10))):
            sel = [p for p in pts if bool(p.get("fp32")) == fp32]
            if sel:
                fig.add_trace(go.Scatter(
                    x=[p["pct_of_fp32"] for p in sel], y=[p["fid_mean"] for p in sel], mode="markers",
                    text=[p["label"] for p in sel], marker=dict(color=color, symbol=symbol, size=size),
                    showlegend=False, name="FP32" if fp32 else "plans",
                    error_y=dict(type="data", array=[p.get("fid_ci95", 0) for p in sel], visible=True),
                    hovertemplate="%{text}<br>size %{x:.1f}% of FP32<br>FID %{y:.3f}<extra></extra>"), 1, i)
        if not pts:  # in paper coordinates: Plotly does not draw the axes of a panel without traces
            lo, hi = fig.layout[f"xaxis{i if i > 1 else ''}"].domain
            fig.add_annotation(text="nothing at this setting yet:<br>press Evaluate", showarrow=False,
                               xref="paper", yref="paper", x=(lo + hi) / 2, y=0.5)
        fig.update_xaxes(title="size, % of FP32", row=1, col=i)
        fig.update_yaxes(title="FID (lower is better)", row=1, col=i)
    fig.update_annotations(font_size=12)
    return _titled(fig, title, 440, top=54)


def sensitivity(units: list[str], measured: list[float], predicted: list[float], predictor: str,
                rho: float, p: float, n_note: str) -> go.Figure:
    """Measured damage of each unit lowered alone (y) against a predictor's value for it (x), log-log."""
    keep = [(u, m, q) for u, m, q in zip(units, measured, predicted) if m > 0 and q > 0]
    fig = go.Figure(go.Scatter(
        x=[q for _, _, q in keep], y=[1000 * m for _, m, _ in keep], mode="markers", text=[u for u, _, _ in keep],
        marker=dict(color="#d62728", size=8),
        hovertemplate="%{text}<br>predicted %{x:.3g}<br>mean |Δ| %{y:.3f} ‰<extra></extra>"))
    _titled(fig, f"measured vs {predictor}: Spearman ρ = {rho:+.3f} (p = {p:.2g}); {n_note}", 420,
            xaxis=dict(title=predictor, **LOG_AXIS), yaxis=dict(title="mean |Δ| to FP32, ‰ of the pixel range", **LOG_AXIS))
    return fig


def image_panels(images: list, titles: list[str], title: str, colorscale: str = "gray", zmin=None, zmax=None,
                 per_row: int = 3) -> go.Figure:
    """Several 2-D arrays in rows of at most `per_row` (e.g. x_t, x0 estimate, saliency), each titled; the
    hover names the panel's quantity."""
    from plotly.subplots import make_subplots

    cols = min(per_row, len(images))
    rows = -(-len(images) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.04,
                        vertical_spacing=0.12 if rows > 1 else 0.0)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        fig.add_trace(go.Heatmap(z=np.asarray(img, dtype=float), colorscale=colorscale, showscale=False, zmin=zmin,
                                 zmax=zmax, name=titles[i],
                                 hovertemplate=f"{titles[i]}<br>value %{{z:.3g}} at (%{{x}}, %{{y}})<extra></extra>"),
                      r + 1, c + 1)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i + 1}", row=r + 1, col=c + 1, **IMAGE_AXIS)
        fig.update_xaxes(row=r + 1, col=c + 1, **IMAGE_AXIS)
    for i in range(len(images), rows * cols):  # the last row's empty cells: no axes
        r, c = divmod(i, cols)
        fig.update_xaxes(visible=False, row=r + 1, col=c + 1)
        fig.update_yaxes(visible=False, row=r + 1, col=c + 1)
    fig.update_annotations(font_size=12)  # subplot titles
    return _titled(fig, title, 80 + 260 * rows, top=50)


def diff_map(panels: dict, title: str) -> go.Figure:
    """Absolute-difference images side by side ({name: 2-D array of 0-255}), pixels square, on one colour scale
    fixed at 0-255 so that two panels, and two runs, compare by eye."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels), horizontal_spacing=0.04)
    for i, (name, z) in enumerate(panels.items(), start=1):
        fig.add_trace(go.Heatmap(z=np.asarray(z, dtype=float), coloraxis="coloraxis", name=name,
                                 hovertemplate=f"{name}<br>|Δ| to FP32 %{{z:.0f}} of 255<extra></extra>"), row=1, col=i)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i if i > 1 else ''}", row=1, col=i, **IMAGE_AXIS)
        fig.update_xaxes(row=1, col=i, **IMAGE_AXIS)
    return _titled(fig, title, 360, top=50, coloraxis=dict(colorscale="Inferno", cmin=0, cmax=255,
                                                          colorbar=dict(title=dict(text="|Δ|", side="right"), **COLORBAR)))


def note(text: str, height: int = 240) -> go.Figure:
    """An empty figure whose title says why there is nothing to draw (a model without a Fisher map)."""
    return _titled(go.Figure(), text, height, xaxis=dict(visible=False), yaxis=dict(visible=False))
