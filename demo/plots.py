"""Plotly figures as pure functions of plain data: tests call them directly.

Readability rules: log axes label every decade as a power of ten (10⁻⁵, not "10μ") with no minor-tick
labels; titles sit above the mode bar; image grids wrap at three panels so they stay legible on a phone.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

PRECISION_COLORS = {"fp32": "#1f77b4", "fp16": "#2ca02c", "bf16": "#17becf", "int8": "#ff7f0e", "int4": "#d62728",
                    "int4-g64": "#e377c2", "int4-g32": "#9467bd"}
LAYOUT = dict(margin=dict(l=10, r=10, t=60, b=10), template="plotly_white")
LOG_AXIS = dict(type="log", exponentformat="power", dtick=1, minor=dict(showgrid=False, ticks=""))
NUMBER_FORMAT = dict(exponentformat="power")  # colour bars and linear axes: 1e-5 as a power, never an SI prefix


def heatmap(rows: list[str], cols: list, z, title: str, colorbar: str, x_title: str = "timestep") -> go.Figure:
    z = np.asarray(z, dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=rows, colorscale="Viridis", colorbar=dict(title=colorbar, **NUMBER_FORMAT),
                               hovertemplate="%{y}<br>" + x_title + " %{x}<br>%{z:.3g}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x_title, height=max(320, 22 * len(rows) + 120), **LAYOUT)
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=10 if len(rows) < 40 else 7))
    return fig


def bars(names: list[str], values, title: str, y_title: str, log: bool = False, colors=None) -> go.Figure:
    fig = go.Figure(go.Bar(x=names, y=np.asarray(values, dtype=float), marker_color=colors))
    fig.update_layout(title=title, yaxis_title=y_title, height=360, **LAYOUT)
    fig.update_yaxes(**(LOG_AXIS if log else NUMBER_FORMAT))
    fig.update_xaxes(tickangle=-45, tickfont=dict(size=9))
    return fig


def precision_map(names: list[str], precisions: list[str], numels: list[int]) -> go.Figure:
    """One bar per tensor (height: parameters, log scale), coloured by the precision the plan gave it."""
    fig = go.Figure()
    for p, color in PRECISION_COLORS.items():
        idx = [i for i, q in enumerate(precisions) if q == p]
        if idx:
            fig.add_trace(go.Bar(x=[names[i] for i in idx], y=[numels[i] for i in idx], name=p, marker_color=color,
                                 hovertemplate="%{x}<br>%{y} params<extra>" + p + "</extra>"))
    fig.update_layout(title="precision per weight tensor", yaxis_title="parameters", barmode="overlay", height=380,
                      legend=dict(orientation="h", y=1.12), **LAYOUT)
    fig.update_xaxes(categoryorder="array", categoryarray=names, showticklabels=len(names) <= 60, tickangle=-60,
                     tickfont=dict(size=7))
    fig.update_yaxes(**LOG_AXIS)
    return fig


def pareto(points: list[dict], title: str = "size vs FID") -> go.Figure:
    """points: {label, pct_of_fp32, fid_mean, fid_ci95, source} (source: 'you', 'report', 'fp32')."""
    fig = go.Figure()
    styles = {"fp32": ("#1f77b4", "star", 14), "report": ("#aaaaaa", "circle", 8), "you": ("#d62728", "diamond", 11)}
    for source, (color, symbol, size) in styles.items():
        pts = [p for p in points if p.get("source") == source]
        if pts:
            fig.add_trace(go.Scatter(
                x=[p["pct_of_fp32"] for p in pts], y=[p["fid_mean"] for p in pts], mode="markers", name=source,
                text=[p["label"] for p in pts], marker=dict(color=color, symbol=symbol, size=size),
                error_y=dict(type="data", array=[p.get("fid_ci95", 0) for p in pts], visible=True),
                hovertemplate="%{text}<br>%{x:.1f}% of FP32<br>FID %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="size, % of FP32", yaxis_title="FID (lower is better)", height=420,
                      **LAYOUT)
    return fig


def sensitivity(units: list[str], measured: list[float], predicted: list[float], predictor: str,
                rho: float, p: float, n_note: str) -> go.Figure:
    """Measured damage of each unit lowered alone (y) against a predictor's value for it (x), log-log."""
    keep = [(u, m, q) for u, m, q in zip(units, measured, predicted) if m > 0 and q > 0]
    fig = go.Figure(go.Scatter(
        x=[q for _, _, q in keep], y=[1000 * m for _, m, _ in keep], mode="markers", text=[u for u, _, _ in keep],
        marker=dict(color="#d62728", size=8),
        hovertemplate="%{text}<br>predicted %{x:.3g}<br>mean |Δ| %{y:.3f} ‰<extra></extra>"))
    fig.update_layout(title=f"measured vs {predictor}: Spearman ρ = {rho:+.3f} (p = {p:.2g}); {n_note}",
                      xaxis=dict(title=predictor, **LOG_AXIS),
                      yaxis=dict(title="mean |Δ| to FP32, ‰ of the pixel range", **LOG_AXIS), height=420, **LAYOUT)
    return fig


def image_panels(images: list, titles: list[str], colorscale: str = "gray", zmin=None, zmax=None,
                 per_row: int = 3) -> go.Figure:
    """Several 2-D arrays in rows of at most `per_row` (e.g. x_t, x0 estimate, saliency)."""
    from plotly.subplots import make_subplots

    cols = min(per_row, len(images))
    rows = -(-len(images) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.04,
                        vertical_spacing=0.12 if rows > 1 else 0.0)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        fig.add_trace(go.Heatmap(z=np.asarray(img, dtype=float), colorscale=colorscale, showscale=False, zmin=zmin,
                                 zmax=zmax), r + 1, c + 1)
        fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor=f"x{i + 1}", row=r + 1, col=c + 1)
        fig.update_xaxes(showticklabels=False, row=r + 1, col=c + 1)
    fig.update_annotations(font_size=12)  # subplot titles
    fig.update_layout(height=80 + 260 * rows, **LAYOUT)
    return fig


def diff_map(panels: dict, title: str) -> go.Figure:
    """Absolute-difference images side by side ({name: 2-D array of 0-255}), pixels square, on one colour scale
    fixed at 0-255 so that two panels, and two runs, compare by eye."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels), horizontal_spacing=0.04)
    for i, (name, z) in enumerate(panels.items(), start=1):
        fig.add_trace(go.Heatmap(z=np.asarray(z, dtype=float), coloraxis="coloraxis", name=name,
                                 hovertemplate=f"{name}<br>|Δ| to FP32 %{{z:.0f}} of 255<extra></extra>"), row=1, col=i)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i if i > 1 else ''}", showticklabels=False, row=1, col=i)
        fig.update_xaxes(showticklabels=False, row=1, col=i)
    fig.update_layout(title=title, height=360, coloraxis=dict(colorscale="Inferno", cmin=0, cmax=255,
                                                             colorbar=dict(title="|Δ|")), **LAYOUT)
    return fig


def note(text: str, height: int = 240) -> go.Figure:
    """An empty figure whose title says why there is nothing to draw (a model without a Fisher map)."""
    fig = go.Figure()
    fig.update_layout(title=text, height=height, xaxis=dict(visible=False), yaxis=dict(visible=False), **LAYOUT)
    return fig
