"""The experiment grid: the source's strategies and past them, each row with size, FID (CI), accuracy, latency.

Every Fisher plan gets a random control at the same size; budget plans at several average bit widths.
Writes docs/report.md, docs/report.csv and docs/report_pareto.svg.
"""
from __future__ import annotations

import copy
import csv
import io
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes
from .diffusion import DEFAULT_GUIDANCE
from .fisher import FisherMap
from .pipeline import SampleSpec, evaluate_fid
from .policy import Plan, Policy, make_plan, param_shapes
from .precision import fallback
from .quantize import quantize_, size_report

TWO_LEVEL = [("global", dict(threshold=0.01)), ("groups", {}), ("layer-ratio", dict(p=0.25)), ("layer-std", dict(k=0.0))]


@dataclass(frozen=True)
class Settings:
    # Sized for 2 CPU cores (about an hour for the 36 rows); a GPU can afford --n 5000 --steps 100.
    n: int = 200
    steps: int = 20
    seeds: int = 3
    guidance: float = DEFAULT_GUIDANCE
    targets: tuple[str, ...] = ("fp16", "int8", "int4")
    budgets: tuple[float, ...] = (8.0, 6.0, 5.0, 4.5)
    statistic: str = "final"  # as the source; budget plans use the mean over timesteps

    @classmethod
    def quick(cls) -> "Settings":
        return cls(n=100, steps=10, seeds=2, targets=("fp16", "int4"), budgets=(6.0, 4.5))


def grid(model, fisher: FisherMap, s: Settings) -> list[tuple[str, Plan]]:
    """(row name, plan) for every row of the report, FP32 first."""
    w = dict(model.named_parameters())
    shapes = param_shapes(model)
    rows = [("fp32", Plan({n: "fp32" for n in shapes}, {"strategy": "none"}))]
    for target in s.targets:
        rows.append((f"uniform {target}", Plan({n: fallback(sh, target) for n, sh in shapes.items()},
                                               {"strategy": "uniform", "target": target})))
    for target in s.targets:
        for strategy, kw in TWO_LEVEL:
            plan = make_plan(Policy(strategy, target=target, statistic=s.statistic, **kw), fisher, w)
            rows.append((f"{strategy} {target}", plan))
            rows.append((f"random @ {strategy} {target}", _random_like(plan, fisher, w, shapes)))
    for bits in s.budgets:
        plan = make_plan(Policy("budget", avg_bits=bits, statistic="mean"), fisher, w)
        rows.append((f"budget {bits:g} bits", plan))
        rows.append((f"random @ budget {bits:g} bits", _random_like(plan, fisher, w, shapes)))
    return rows


def _random_like(plan: Plan, fisher, w, shapes) -> Plan:
    """A random allocation no larger than `plan`, lowering tensors to the precisions `plan` uses (a two-level
    FP16 plan gets an FP16-only control): the control that tells whether Fisher's choice of tensors mattered."""
    budget = size_report(plan, shapes).total_bytes
    # Precisions the plan gives to matrices (vectors only reach fp16 as the integer formats' fallback).
    used = sorted({p for n, p in plan.precisions.items() if p != "fp32" and len(shapes[n]) > 1})
    return make_plan(Policy("random", budget_bytes=budget, seed=0, lower_to=tuple(used) or ("fp16",)), fisher, w)


def paired_delta(values: list[float], base: list[float]) -> tuple[float, float]:
    """Mean and 95% CI of the per-seed FID difference to FP32: every row samples from the same
    noise per seed, so pairing removes the seed-to-seed variation both rows share."""
    from .metrics import mean_ci95

    return mean_ci95([a - b for a, b in zip(values, base)])


def run(model, fisher: FisherMap, s: Settings, backend, classifier, log=print, on_row=None) -> list[dict]:
    """Evaluate every row of the grid; `on_row(rows so far, total rows)` after each (for partial writes)."""
    shapes = param_shapes(model)
    out = []
    plans = grid(model, fisher, s)
    for name, plan in plans:
        q = model if name == "fp32" else quantize_(copy.deepcopy(model), plan)
        rep = size_report(plan, shapes)
        t0 = time.perf_counter()
        spec = SampleSpec(n=s.n, steps=s.steps, guidance=s.guidance, batch_size=128)
        r = evaluate_fid(q, spec, list(range(s.seeds)), backend=backend,
                         classifier=classifier, num_classes=model.cfg.num_classes)
        per_image = (time.perf_counter() - t0) / (s.n * s.seeds)
        row = {"name": name, "bytes": rep.total_bytes, "pct_of_fp32": round(rep.pct_of_fp32, 2),
               "avg_bits": round(rep.avg_bits, 3), "guidance": spec.guidance, "fid_mean": round(r.mean, 4), "fid_ci95": round(r.ci95, 4),
               "accuracy": round(100 * sum(r.accuracy) / len(r.accuracy), 2), "ms_per_image": round(1000 * per_image, 2),
               "backend": r.backend, "n": r.n, "seeds": s.seeds, "counts": {k: v for k, v in plan.counts().items() if v},
               "fid_values": r.values, "accuracy_values": r.accuracy}
        d, dci = paired_delta(r.values, out[0]["fid_values"] if out else r.values)
        row.update(dfid_mean=round(d, 4), dfid_ci95=round(dci, 4))
        log(f"{name:32} {row['pct_of_fp32']:6.2f}% {row['avg_bits']:6.2f} bits  FID {row['fid_mean']:.3f} ± "
            f"{row['fid_ci95']:.3f}  ΔFID {d:+.3f} ± {dci:.3f}  acc {row['accuracy']:.1f}%  {row['ms_per_image']:.1f} ms/img")
        out.append(row)
        if on_row:
            on_row(out, len(plans))
    return out


def write(rows: list[dict], s: Settings, command: str, seconds: float, out_dir: Path, total_rows: int | None = None,
          floor=None) -> None:
    """docs/report.md, report.csv, report_pareto.svg from the rows; `floor`: the real-vs-real FIDResult at this N."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    fields = ["name", "bytes", "pct_of_fp32", "avg_bits", "fid_mean", "fid_ci95", "dfid_mean", "dfid_ci95", "accuracy",
              "ms_per_image", "backend", "n", "seeds"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out_dir / "report.csv", buf.getvalue().encode())
    atomic_write_bytes(out_dir / "report_pareto.svg", pareto_svg(rows).encode())
    fp32 = rows[0]
    partial = total_rows is not None and len(rows) < total_rows
    lines = ["# Report: Fisher-guided quantization of the shipped U-Net\n",
             *([f"**Partial: {len(rows)} of {total_rows} rows so far.**\n"] if partial else []),
             f"Command: `{command}` — {seconds / 60:.1f} min on {platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}.\n",
             f"FID backend **{fp32['backend']}**, N = {s.n} samples per seed (class-balanced, guidance {s.guidance:g}, DDIM-{s.steps}) "
             f"against the held-out mnist-train5k reference; ± is the 95% t-interval over {s.seeds} sampling seeds. "
             "Accuracy: the shipped classifier on the same samples. Size: numel × element size per dtype plus fp32 "
             "scales (the source's definition). Two-level policies rank tensors by Fisher at the final denoising "
             "step (as the source); budget plans by the mean over timesteps. Every row draws the same noise per seed, "
             "so ΔFID is the per-seed difference to FP32 with its own (paired) 95% interval: much tighter than "
             "comparing the two FID intervals.\n",
             *([f"Real-vs-real floor at the same backend and N ({floor.n} of mnist-test10k vs mnist-train5k, "
                f"{len(floor.values)} draws): FID {floor.mean:.3f} ± {floor.ci95:.3f}, the best any model could score "
                "here; at this small N most of every FID below is estimation bias shared by all rows.\n"] if floor else []),
             "| plan | size (bytes) | % of FP32 | bits/weight | FID | ΔFID vs FP32 (paired) | accuracy % | ms/image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['bytes']:,} | {r['pct_of_fp32']:.2f} | {r['avg_bits']:.2f} | "
                     f"{r['fid_mean']:.3f} ± {r['fid_ci95']:.3f} | {r['dfid_mean']:+.3f} ± {r['dfid_ci95']:.3f} | "
                     f"{r['accuracy']:.1f} | {r['ms_per_image']:.1f} |")
    lines += ["", "![size vs FID](report_pareto.svg)", "", "## What the data say", ""] + findings(rows)
    atomic_write_bytes(out_dir / "report.md", ("\n".join(lines) + "\n").encode())


def _overlap(a: dict, b: dict) -> bool:
    return abs(a["fid_mean"] - b["fid_mean"]) <= a["fid_ci95"] + b["fid_ci95"]


def _paired_vs(a: dict, b: dict) -> tuple[float, float]:
    return paired_delta(a["fid_values"], b["fid_values"])


def findings(rows: list[dict]) -> list[str]:
    """Plain statements against the issue's goals, computed from the rows (no editorialising)."""
    by = {r["name"]: r for r in rows}
    fp32 = by["fp32"]
    out = ["Goal 1: FP16 plans change FID by no more than their confidence interval."]
    for r in rows:
        if r["name"].endswith("fp16") and not r["name"].startswith("random"):
            zero_in = abs(r["dfid_mean"]) <= r["dfid_ci95"]
            out.append(f"- {r['name']}: ΔFID {r['dfid_mean']:+.3f} ± {r['dfid_ci95']:.3f} (paired): "
                       + ("consistent with no change — **met**." if zero_in else
                          f"a measurable change ({100 * r['dfid_mean'] / fp32['fid_mean']:+.2f}% of FP32's FID) — **not met**.")
                       + f" Unpaired: {r['fid_mean']:.3f} ± {r['fid_ci95']:.3f} vs FP32 {fp32['fid_mean']:.3f} ± "
                       f"{fp32['fid_ci95']:.3f} ({'overlapping' if _overlap(r, fp32) else 'non-overlapping'}).")
    out += ["", "Goal 2: at ≤ 4.5 average bits the budget plan's FID is within 10% of FP32, and better than uniform "
            "INT4 and than the random control at equal size, with non-overlapping intervals."]
    u4 = by.get("uniform int4")
    for name, r in by.items():
        if not name.startswith("budget"):
            continue
        rel = 100 * (r["fid_mean"] / fp32["fid_mean"] - 1)
        parts = [f"FID {r['fid_mean']:.3f} ± {r['fid_ci95']:.3f}, {rel:+.1f}% vs FP32 "
                 f"({'within' if abs(rel) <= 10 else 'outside'} 10%)"]
        met = abs(rel) <= 10
        for label, other in (("random control", by.get(f"random @ {name}")), ("uniform int4", u4)):
            if other is None:
                continue
            d, ci = _paired_vs(r, other)
            better = r["fid_mean"] < other["fid_mean"] and not _overlap(r, other)
            met = met and better
            smaller = 100 * (1 - other["bytes"] / r["bytes"])
            parts.append(f"vs {label} ({other['avg_bits']:.2f} bits) {other['fid_mean']:.3f} ± {other['fid_ci95']:.3f}: "
                         f"{'better, non-overlapping' if better else 'overlapping or worse'} (paired Δ {d:+.3f} ± {ci:.3f})"
                         + (f" — note the {label} is {smaller:.0f}% smaller, not equal in size" if smaller > 2 else ""))
        verdict = (" — **met**." if met else " — **not met**.") if r["avg_bits"] <= 4.5 + 1e-9 else " (above 4.5 bits: context)."
        out.append(f"- {name} ({r['avg_bits']:.2f} bits): " + "; ".join(parts) + verdict)
    return out


def pareto_svg(rows: list[dict], width: int = 720, height: int = 440) -> str:
    """Size (% of FP32) vs FID with CI bars, as a dependency-free SVG."""
    pad = 60
    xs = [r["pct_of_fp32"] for r in rows]
    ys = [r["fid_mean"] for r in rows]
    hi = max(y + r["fid_ci95"] for y, r in zip(ys, rows))
    lo = min(max(0.0, y - r["fid_ci95"]) for y, r in zip(ys, rows))
    x0, x1 = 0.0, max(105.0, max(xs))
    y0, y1 = lo * 0.95, hi * 1.05 if hi > 0 else 1.0

    def px(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def py(y):
        return height - pad - (y - y0) / max(y1 - y0, 1e-9) * (height - 2 * pad)

    color = lambda n: "#1f77b4" if n == "fp32" else "#999" if n.startswith("random") else "#d62728" if n.startswith("budget") else "#2ca02c" if n.startswith("uniform") else "#ff7f0e"  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 20}" text-anchor="middle">size, % of FP32</text>',
             f'<text x="15" y="{height / 2}" transform="rotate(-90 15 {height / 2})" text-anchor="middle">FID (lower is better)</text>']
    for t in range(0, int(x1) + 1, 25):
        parts.append(f'<text x="{px(t)}" y="{height - pad + 15}" text-anchor="middle">{t}</text>')
    for k in range(5):
        v = y0 + k * (y1 - y0) / 4
        parts.append(f'<text x="{pad - 5}" y="{py(v) + 4}" text-anchor="end">{v:.2f}</text>')
    for r in rows:
        x, y, c = px(r["pct_of_fp32"]), py(r["fid_mean"]), color(r["name"])
        parts.append(f'<line x1="{x}" x2="{x}" y1="{py(r["fid_mean"] - r["fid_ci95"])}" y2="{py(r["fid_mean"] + r["fid_ci95"])}" stroke="{c}"/>')
        parts.append(f'<circle cx="{x}" cy="{y}" r="4" fill="{c}"><title>{r["name"]}: {r["fid_mean"]:.3f}</title></circle>')
    for i, (label, c) in enumerate([("fp32", "#1f77b4"), ("uniform", "#2ca02c"), ("Fisher two-level", "#ff7f0e"),
                                    ("budget", "#d62728"), ("random control", "#999")]):
        parts.append(f'<circle cx="{width - pad - 110}" cy="{pad + 14 * i}" r="4" fill="{c}"/>'
                     f'<text x="{width - pad - 100}" y="{pad + 14 * i + 4}">{label}</text>')
    return "\n".join(parts + ["</svg>"])


def settings_with(s: Settings, **kw) -> Settings:
    return replace(s, **{k: v for k, v in kw.items() if v is not None})
