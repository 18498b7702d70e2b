"""The evidence: where precision matters, and whether a Fisher-guided plan beats the simple choices.

Two stages, both resumable (every finished (plan, seed) is a JSON record in the cache directory):
  1. sensitivity validation (lafq.sensitivity): one weight matrix at a time to INT4, the rest FP32;
     the measured fidelity loss against each predictor (Fisher, Fisher × error, error, magnitude,
     random), Spearman ρ.
  2. the grid: FP32; uniform FP16 / INT8 / INT4; the strong simple baselines (INT4 with INT8 stem and
     head, group-wise INT4-g32 / -g64, and the head-protecting recipes in RECIPES: INT4 or INT4-g32 with the
     first and last layers at FP16 or INT8, INT8 with the last layer at FP16); the budget plan solved exactly at
     the baselines' own sizes
     and at 8 / 6 / 5 / 4.5 / 4.25 bits; the same budget guided by quantization error alone and by
     weight magnitude; random controls built up to within 1% of a plan's size, several seeds each;
     the source's four FP16 strategies.
Every row samples from the same noise per seed as FP32, so its FID difference to FP32 and its fidelity
(mean |Δ|, PSNR, classifier-feature distance, class agreement) are paired, per seed; ± is the 95%
Student-t interval over seeds. Writes docs/report.md, report.csv (one line per plan × seed),
sensitivity.csv (one line per unit × seed), report_pareto.svg and sensitivity.svg.

The model measured (`Subject`) is the project U-Net by default; `report --model DIR` measures a folder
written by train-diffusers against its own classifier and data. There "stem and head" are the model's first
and last convolutions (`edge_layers`), budgets below its size floor are left out (`feasible_budgets`), and
the source's FP16 strategies, defined on the U-Net's layer names, are not run.
"""
from __future__ import annotations

import csv
import io
from collections import Counter
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .checkpoint import atomic_write_bytes
from .diffusion import DEFAULT_GUIDANCE
from .fisher import FisherMap
from .metrics import FIDELITY, METRICS, mean_ci95
from .pipeline import SampleSpec
from .policy import Plan, Policy, make_plan, param_shapes
from .precision import fallback
from .quantize import size_report
from .sensitivity import PREDICTORS, SensitivitySettings

SOURCE_STRATEGIES = [("global", dict(threshold=0.01)), ("groups", {}), ("layer-ratio", dict(p=0.25)),
                     ("layer-std", dict(k=0.0))]
# The source system's own table (LAQFI: DDPM U-Net on MNIST, single runs, Inception FID): row -> (FID, % smaller).
SOURCE_TABLE = {"fp32": (22.75, 0.0), "uniform fp16": (24.13, 49.6), "groups fp16": (23.84, 49.4),
                "layer-ratio fp16": (22.42, 23.8), "layer-std fp16": (23.16, 39.2)}
SOURCE_LABELS = {"fp32": "FP32", "uniform fp16": "uniform FP16", "groups fp16": "layer groups 12\\|3456",
                 "layer-ratio fp16": "per-layer ratio p = 0.25", "layer-std fp16": "per-layer mean/std"}
EDGE = "int4, int8 stem+head"
G32 = "uniform int4-g32"
PINNED_ERROR = "error-only budget, fp16 head @ int4-g32 size"
MEASURED = "measured-sensitivity budget @ int4-g32 size"
# The recipes a careful practitioner uses: the first and last layers kept at a higher precision than the rest
# (name -> (target, edge precision, which edges)); each is compared with the budget plan at its own size.
RECIPES = {"int4, fp16 stem+head": ("int4", "fp16", "both"), "int4-g32, int8 stem+head": ("int4-g32", "int8", "both"),
           "int4-g32, fp16 stem+head": ("int4-g32", "fp16", "both"), "int8, fp16 head": ("int8", "fp16", "last")}
LOWER_IS_BETTER = {n: m.lower_is_better for n, m in METRICS.items() if n != "accuracy"}  # compared pairwise


@dataclass(frozen=True)
class Subject:
    """The model a report measures, and the real data its numbers are measured against."""
    name: str = "the project's MNIST U-Net"
    classifier: str = "the shipped MNIST classifier's 128-d features; Inception weights are not available offline"
    reference: str = "mnist-train5k"  # the held-out real images FID is measured against
    floor_images: str = "mnist-test10k"  # the real images drawn for the real-vs-real floor
    edge_layers: tuple[str, ...] = ("stem", "head")  # the baseline's "first and last layers"
    source_strategies: bool = True  # the source's FP16 strategies are defined on this U-Net's layer names
    conditioning: str = "class-balanced"  # what the samples are conditioned on, in words
    sampler: str = "DDIM-{steps} (η = 0)"  # the deterministic sampler, in words (a flow-matching model: Euler)

    @property
    def pixels_only(self) -> bool:
        """No classifier ships with the model: fidelity in pixels only (no FID, features or class agreement)."""
        return self.classifier is None


def edge_layers(model) -> tuple[str, str]:
    """The model's first and last layers (lafq.layers): what practitioners keep at higher precision. The project
    U-Net: ("stem", "head"); a diffusers UNet2DModel: ("conv_in", "conv_out"); a DiT: its patch embedding and
    output projection. A model whose first and last matrices share one layer has no such baseline."""
    from .layers import layers_of
    from .plan import param_shapes

    first, last = layers_of(param_shapes(model)).edges
    if first == last:
        raise ValueError(f"the first and last weight matrices share the layer {first!r}: no first and last layers "
                         "to keep at higher precision")
    return first, last


@dataclass(frozen=True)
class Settings:
    # N = 1,000 per seed at DDIM-50: 3.7-8 min per (plan, seed) on 2 CPU cores (measured, idle to loaded); a GPU affords N = 5,000, DDIM-100.
    n: int = 1000
    steps: int = 50
    seeds: int = 3
    guidance: float = DEFAULT_GUIDANCE
    random_seeds: int = 5
    batch_size: int = 128  # images per sampling batch; part of every record's key (a GPU run uses 256)
    budgets: tuple[float, ...] = (8.0, 6.0, 5.0, 4.5, 4.25)  # 4 bits is below the U-Net's 4.17-bit floor
    statistic: str = "final"  # the source's strategies rank by Fisher at the final step; budgets use the mean
    sensitivity: SensitivitySettings = field(default_factory=SensitivitySettings)

    @classmethod
    def quick(cls) -> "Settings":
        return cls(n=50, steps=10, seeds=3, random_seeds=2, budgets=(6.0, 4.5),
                   sensitivity=SensitivitySettings(n=16, steps=10, seeds=2, unit="layer"))

    def spec(self, seed: int) -> SampleSpec:
        return SampleSpec(n=self.n, steps=self.steps, guidance=self.guidance, seed=seed, batch_size=self.batch_size)


@dataclass(frozen=True)
class Row:
    name: str
    plan: Plan
    kind: str  # reference, uniform, baseline, budget, signal, source, random
    control_of: str | None = None  # random rows: the plan they control for
    seeds: tuple[int, ...] | None = None  # noise seeds to sample; None: all of Settings.seeds


def floor_bits(shapes: dict[str, tuple]) -> float:
    """Bits per weight of the smallest allocation the budget can make (scales included)."""
    from .policy import floor_bytes

    return 8 * floor_bytes(shapes) / sum(math.prod(sh) for sh in shapes.values())


def feasible_budgets(shapes: dict[str, tuple], budgets) -> tuple[float, ...]:
    """The budgets (bits per weight) an allocation can meet, as resolve_budget counts them: a small model
    whose biases and norms weigh much has a higher floor than the project U-Net's 4.17 bits."""
    from .policy import floor_bytes

    total, lo = sum(math.prod(sh) for sh in shapes.values()), floor_bytes(shapes)
    return tuple(b for b in budgets if int(b * total / 8) >= lo)


def measured_scores(sensitivity_records: list[dict]) -> dict[str, float]:
    """Each tensor's measured damage from the sensitivity stage (that tensor alone at INT4: mean |Δ| to FP32,
    mean over seeds); empty unless the stage measured single tensors."""
    by: dict[str, list[float]] = {}
    for r in sensitivity_records:
        if r.get("unit_kind") == "tensor" and r.get("precision") == "int4":
            by.setdefault(r["unit"], []).append(r["mad"])
    return {u: sum(v) / len(v) for u, v in by.items()}


def measured_budget(fisher: FisherMap, weights: dict, measured: dict[str, float], budget: int) -> Plan:
    """The exact budget with each tensor weighted by its *measured* damage instead of Fisher (MixDQ-style: an
    allocation from measured single-tensor sensitivity): at precision p a tensor costs
    measured × ‖Q_p(w) − w‖² / ‖Q_int4(w) − w‖². A tensor the sensitivity stage did not measure (a vector: FP32
    or FP16 only) is weighted as the most sensitive measured one, so it stays FP32 wherever the bytes allow."""
    from .policy import budget_options, solve_budget

    opts = budget_options(fisher, weights, "mean", signal="error")
    scale = {}
    for n in measured:
        e4 = next((d for _, d, p in opts[n] if p == "int4"), 0.0)
        scale[n] = measured[n] / e4 if e4 > 0 else 0.0
    top = max(scale.values(), default=1.0)  # a tensor not measured (a vector) weighs as the most sensitive one
    best = solve_budget({n: [(b, d * scale.get(n, top), p) for b, d, p in o] for n, o in opts.items()}, budget)
    return Plan(best.precisions, {"strategy": "budget", "signal": "measured", "budget_bytes": budget,
                                  "statistic": "mean"})


def grid(model, fisher: FisherMap, s: Settings, subject: Subject = Subject(),
         measured: dict[str, float] | None = None) -> list[Row]:
    """Every row of the report in the order it is evaluated: the comparisons that answer the main
    question first, so a partial run already answers it. The source's FP16 strategies only where
    `subject.source_strategies` (they name the project U-Net's layers). `measured` (measured_scores of the
    sensitivity stage) adds the budget weighted by measured single-tensor damage."""
    w = dict(model.named_parameters())
    shapes = param_shapes(model)

    def plan(**kw) -> Plan:
        return make_plan(Policy(**kw), fisher, w)

    def uniform(target: str) -> Row:
        return Row(f"uniform {target}", Plan({n: fallback(sh, target) for n, sh in shapes.items()},
                                             {"strategy": "uniform", "target": target}), "uniform")

    def size(p: Plan) -> int:
        return size_report(p, shapes).total_bytes

    def controls(of: Row, label: str) -> list[Row]:
        """Random controls of `of`: seed k samples at noise seed k mod `seeds`, so the controls cover plan and
        noise variation at one sampling run each (5 controls cost 5 runs, not 15); a seed that yields a plan
        an earlier seed already gave is dropped (near the INT4 floor there is little room to differ)."""
        lower = tuple(sorted({p for p in of.plan.precisions.values() if p != "fp32"}))
        out, seen = [], set()
        for k in range(s.random_seeds):
            p = plan(strategy="random", budget_bytes=size(of.plan), seed=k, lower_to=lower or ("fp16",))
            key = tuple(sorted(p.precisions.items()))
            if key not in seen:
                seen.add(key)
                out.append(Row(f"random {k} @ {label}", p, "random", of.name, seeds=(k % s.seeds,)))
        return out

    fp32 = Row("fp32", Plan({n: "fp32" for n in shapes}, {"strategy": "none"}), "reference")
    u4 = uniform("int4")
    edge = Row(EDGE, plan(strategy="first-last", target="int4", edge="int8", edge_layers=subject.edge_layers),
               "baseline")
    g32 = Row(G32, uniform("int4-g32").plan, "baseline")
    at_edge = Row(f"budget @ {EDGE} size", plan(strategy="budget", budget_bytes=size(edge.plan), statistic="mean"),
                  "budget")
    at_g32 = Row("budget @ int4-g32 size", plan(strategy="budget", budget_bytes=size(g32.plan), statistic="mean"),
                 "budget")
    signals = [Row(f"{label} budget @ int4-g32 size", plan(strategy="budget", budget_bytes=size(g32.plan),
                                                           statistic="mean", signal=sig), "signal")
               for sig, label in (("error", "error-only"), ("magnitude", "magnitude"))]
    # The error-only budget told what a practitioner knows without Fisher: keep the last layer at FP16.
    signals.append(Row(PINNED_ERROR, plan(strategy="budget", budget_bytes=size(g32.plan), statistic="mean",
                                          signal="error", pinned={subject.edge_layers[-1]: "fp16"}), "signal"))
    if measured:
        signals.append(Row(MEASURED, measured_budget(fisher, w, measured, size(g32.plan)), "signal"))
    recipes = []
    for name, (target, edge_p, which) in RECIPES.items():
        layers = subject.edge_layers if which == "both" else subject.edge_layers[-1:]
        r = Row(name, plan(strategy="first-last", target=target, edge=edge_p, edge_layers=layers), "baseline")
        recipes += [r, Row(f"budget @ {name} size", plan(strategy="budget", budget_bytes=size(r.plan),
                                                         statistic="mean"), "budget")]
    rows = [fp32, edge, at_edge, g32, at_g32, u4, *signals, *recipes, *controls(at_g32, "int4-g32 size"),
            *controls(at_edge, f"{EDGE} size"),
            Row("uniform int4-g64", uniform("int4-g64").plan, "baseline"), uniform("int8"), uniform("fp16")]
    for strategy, kw in SOURCE_STRATEGIES if subject.source_strategies else ():
        rows.append(Row(f"{strategy} fp16", plan(strategy=strategy, target="fp16", statistic=s.statistic, **kw),
                        "source"))
    budget_rows = [Row(f"budget {b:g} bits", plan(strategy="budget", avg_bits=b, statistic="mean"), "budget")
                   for b in s.budgets]
    rows += budget_rows
    for r in budget_rows:
        rows += controls(r, r.name)
    return rows


def _last_matrix(shapes: dict[str, tuple]) -> str | None:
    """The largest weight matrix of the model's last layer (lafq.layers): its precision is what the random
    controls' spread follows (a 4-bit output convolution costs more than any allocation elsewhere)."""
    from .layers import layers_of

    layers = layers_of(shapes)
    last = [n for n in shapes if layers.layer(n) == layers.edges[1] and len(shapes[n]) >= 2]
    return max(last, key=lambda n: math.prod(shapes[n])) if last else None


def evaluate(rows: list[Row], evaluator, s: Settings, log=print, on_record=None) -> list[dict]:
    """Every (row, seed) record, FP32 first; `on_record(records)` after each (for partial writes).
    With `evaluator.cached_only`, only the records already on disk (nothing is sampled)."""
    shapes = param_shapes(evaluator.den.module)
    last = _last_matrix(shapes)
    planned_controls = {}
    for row in rows:
        if row.control_of:
            planned_controls[row.control_of] = planned_controls.get(row.control_of, 0) + 1
    records = []
    for i, row in enumerate(rows):
        rep = size_report(row.plan, shapes)
        extra = {"kind": row.kind, "control_of": row.control_of, "bytes": rep.total_bytes,
                 "planned_controls": planned_controls.get(row.control_of) if row.control_of else None,
                 "pct_of_fp32": round(rep.pct_of_fp32, 3), "avg_bits": round(rep.avg_bits, 4),
                 "counts": {k: v for k, v in row.plan.counts().items() if v},
                 "last_layer": row.plan.precisions.get(last) if last else None,
                 "planned_seeds": len(row.seeds) if row.seeds is not None else s.seeds}
        for seed in (row.seeds if row.seeds is not None else range(s.seeds)):
            rec = evaluator.record(row.name, None if row.kind == "reference" else row.plan, s.spec(seed), extra)
            if rec is None:  # cached_only and not measured yet
                continue
            rec.update(extra, name=row.name)
            records.append(rec)
            if on_record:
                on_record(records)
        done = [r for r in records if r["name"] == row.name]
        if not done:
            continue
        mean = lambda k: sum(r[k] for r in done) / len(done)  # noqa: E731
        log(f"[{i + 1}/{len(rows)}] {row.name:42} {rep.pct_of_fp32:6.2f}%"
            + (f"  FID {mean('fid'):8.3f}" if done[0].get("fid") is not None else "")
            + f"  mean|Δ| {mean('mad'):.4f}"
            + (f"  agree {100 * mean('agreement'):5.1f}%" if done[0].get("agreement") is not None else ""))
    return records


# -- summaries -----------------------------------------------------------------------------------

def _by_name(records: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        out.setdefault(r["name"], {})[r["seed"]] = r
    return out


def image_level(records: list[dict], a: str, b: str) -> dict | None:
    """Tests over images beside the seed-level intervals, pooled over the seeds where both plans' records carry
    per-image values (records measured before they were kept have none: None). Class flips: of the images where
    exactly one plan keeps FP32's class, how many are each plan's, with the exact two-sided McNemar p (a binomial
    test of that split against one half). Per-image mean |Δ|: the paired difference a − b over images, mean and
    95% Student-t half-width."""
    from scipy.stats import binomtest

    by = _by_name(records)
    pa_by, pb_by = by.get(a, {}), by.get(b, {})
    only_a = only_b = 0
    diffs: list[float] = []
    seeds = 0
    classes = True
    for seed in sorted(set(pa_by) & set(pb_by)):
        pa, pb = pa_by[seed].get("per_image"), pb_by[seed].get("per_image")
        if not pa or not pb or len(pa["mad"]) != len(pb["mad"]):
            continue
        seeds += 1
        classes = classes and "agree" in pa and "agree" in pb  # no classifier: no class flips
        if classes:
            only_a += sum(x == "1" and y == "0" for x, y in zip(pa["agree"], pb["agree"]))
            only_b += sum(x == "0" and y == "1" for x, y in zip(pa["agree"], pb["agree"]))
        diffs += [u - v for u, v in zip(pa["mad"], pb["mad"])]
    if not seeds:
        return None
    n = only_a + only_b
    flips = {"kept_by_a_only": only_a, "kept_by_b_only": only_b,
             "mcnemar_p": float(binomtest(only_a, n, 0.5).pvalue) if n else 1.0} if classes else {}
    return {"images": len(diffs), "seeds": seeds, **flips, "mad": mean_ci95(diffs)}


def describe_image_level(t: dict, a: str, b: str) -> str:
    m, h = t["mad"]
    flips = (f"FP32's class kept by {a} alone on {t['kept_by_a_only']}, by {b} alone on {t['kept_by_b_only']} "
             f"(exact McNemar p = {t['mcnemar_p']:.2g}); " if "mcnemar_p" in t else "")
    return (f"over images ({t['images']:,}, {t['seeds']} seeds): {flips}"
            f"per-image mean |Δ| {1000 * m:+.2f} ± {1000 * h:.2f} ‰ (paired over images)")


def paired(a: dict[int, dict], b: dict[int, dict], metric: str) -> tuple[float, float, int] | None:
    """Mean and 95% CI of a − b per shared seed (same noise), and the number of seeds; None if none shared."""
    seeds = sorted(set(a) & set(b))
    if not seeds or any(x[k].get(metric) is None for x in (a, b) for k in seeds):
        return None  # none shared, or a measure this model has not (no classifier: no FID, features, agreement)
    m, ci = mean_ci95([a[k][metric] - b[k][metric] for k in seeds])
    return m, ci, len(seeds)


def paired_delta(values: list[float], base: list[float]) -> tuple[float, float]:
    """Mean and 95% CI of the per-seed difference of two rows sampled from the same noise per seed."""
    return mean_ci95([a - b for a, b in zip(values, base)])


def summarize(records: list[dict]) -> list[dict]:
    """One summary per row (in first-seen order): size, and mean ± CI over seeds of every metric;
    FID also as the paired difference to FP32."""
    by = _by_name(records)
    fp32 = by.get("fp32", {})
    out = []
    for name, seeds in by.items():
        first = next(iter(seeds.values()))
        row = {k: first[k] for k in ("name", "kind", "control_of", "bytes", "pct_of_fp32", "avg_bits", "n", "steps",
                                     "guidance", "backend", "counts", "planned_seeds", "planned_controls", "last_layer")
               if k in first}
        row["seeds"] = len(seeds)
        for metric in ("fid", "accuracy", *FIDELITY):
            vals = [r[metric] for r in seeds.values() if r.get(metric) is not None]
            row[metric], row[f"{metric}_ci95"] = mean_ci95(vals) if vals else (math.nan, math.nan)
        d = paired(seeds, fp32, "fid")
        row["dfid"], row["dfid_ci95"] = (d[0], d[1]) if d else (math.nan, math.nan)
        row["ms_per_image"] = 1000 * sum(r["seconds"] for r in seeds.values()) / sum(r["n"] for r in seeds.values())
        out.append(row)
    return out


def complete(row: dict | None, seeds: int = 1) -> bool:
    """A summarized row measured on every seed it plans (`seeds` for records older than planned_seeds)."""
    return row is not None and row["seeds"] >= (row.get("planned_seeds") or seeds)


def compare(records: list[dict], a: str, b: str | list[str]) -> dict[str, tuple[float, float, int]] | None:
    """Paired a − b per metric (mean, 95% CI, number of pairs), for the metrics both rows measured (mean |Δ|
    always). `b` a list (random controls): every (control, seed) record paired with `a` at that seed, so the
    interval spans both the controls' plans and the noise."""
    by = _by_name(records)
    if a not in by:
        return None
    if isinstance(b, str):
        if b not in by:
            return None
        out = {m: paired(by[a], by[b], m) for m in LOWER_IS_BETTER}
        return {m: v for m, v in out.items() if v is not None} if out["mad"] is not None else None
    pairs = [(by[a][k], by[x][k]) for x in b if x in by for k in sorted(by[x]) if k in by[a]]
    if not pairs:
        return None
    return {m: (*mean_ci95([pa[m] - pb[m] for pa, pb in pairs]), len(pairs)) for m in LOWER_IS_BETTER
            if all(r.get(m) is not None for pair in pairs for r in pair)}


def verdict(metric: str, d: tuple[float, float, int], n: int, unit: str = "seeds") -> str:
    """'better' / 'worse' when the paired 95% interval excludes 0, else no difference detectable."""
    mean, ci, k = d
    if k < 2 or abs(mean) <= ci:
        return f"no difference detectable at N = {n:,} × {k} {unit}"
    good = (mean < 0) == LOWER_IS_BETTER[metric]
    return "better" if good else "worse"


def _fmt(metric: str, v: float) -> str:
    return METRICS[metric].show(v) if metric in METRICS else f"{v:.3f}"


UNITS = {n: m.unit for n, m in METRICS.items()}
DELTA_LABELS = {"fid": "ΔFID", "mad": "Δ mean abs Δ", "psnr": "Δ PSNR", "feature_distance": "Δ feature distance",
                "agreement": "Δ class agreement"}


def describe_compare(c: dict, n: int, unit: str = "seeds") -> str:
    return "; ".join(f"{DELTA_LABELS[m]} {_sign(m, c[m][0])} ± {_fmt(m, c[m][1])}{UNITS[m]} ({verdict(m, c[m], n, unit)})"
                     for m in ("fid", "mad", "psnr", "feature_distance", "agreement") if m in c)


def _with_ci(value: str, ci: str, seeds: int) -> str:
    """'value ± ci'; one seed has no interval, so its value is shown bare, never as '± 0'."""
    return f"{value} ± {ci}" if seeds > 1 else value


def _sign(metric: str, v: float) -> str:
    return ("-" if v < 0 else "+") + _fmt(metric, abs(v))


# -- files ---------------------------------------------------------------------------------------

CSV_FIELDS = ["name", "kind", "control_of", "planned_controls", "seed", "planned_seeds", "bytes", "pct_of_fp32", "avg_bits",
              "last_layer", "n", "steps", "sampler",
              "guidance", "backend", "fid", "accuracy", "mad", "psnr", "feature_distance", "agreement", "seconds",
              "device", "machine", "plan_digest"]
SENS_FIELDS = ["unit", "unit_kind", "precision", "seed", "n", "steps", "sampler", "guidance", "mad", "psnr",
               "feature_distance", "agreement", *[f"pred_{p}" for p in PREDICTORS if p != "random"], "seconds",
               "machine"]


def _csv(rows: list[dict], fields: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def read_csv(path) -> list[dict]:
    """report.csv / sensitivity.csv back into records (numbers as floats): every interval can be re-derived."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rec = {}
            for k, v in r.items():
                try:
                    rec[k] = int(v) if k in ("seed", "n", "steps", "bytes") else float(v)
                except (TypeError, ValueError):
                    rec[k] = v if v != "" else None
            out.append(rec)
    return out


def write(records: list[dict], s: Settings, command: str, out_dir: Path, *, total_rows: int | None = None,
          floor=None, sensitivity: list[dict] | None = None, sensitivity_units: int | None = None,
          subject: Subject = Subject(), budget_floor_bits: float | None = None,
          sensitivity_skipped: bool = False) -> None:
    """docs/report.md, report.csv, sensitivity.csv and the two figures from the records so far."""
    from .evaluate import machine
    from .sensitivity import summarize as sens_summary

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "report.csv", _csv(records, CSV_FIELDS))
    rows = summarize(records)
    done = [r for r in rows if complete(r, s.seeds)]
    partial = total_rows is not None and len(done) < total_rows
    if rows:
        atomic_write_bytes(out_dir / "report_pareto.svg", pareto_svg(rows).encode())
    sens = None
    if sensitivity:
        atomic_write_bytes(out_dir / "sensitivity.csv", _csv(sensitivity, SENS_FIELDS))
        sens = sens_summary(sensitivity)
        if sens:
            atomic_write_bytes(out_dir / "sensitivity.svg", sensitivity_svg(sens).encode())
    backend = rows[0].get("backend") if rows else (floor.backend if floor is not None else "?")
    machines = sorted({r["machine"] for r in [*records, *(sensitivity or [])] if r.get("machine")}) or [machine()]
    default = subject == Subject()
    lines = ["# Report: does Fisher guidance beat strong simple baselines?\n",
             *([] if default else [f"Model: {subject.name}. The baseline's stem and head are its first and last "
                                   f"layers ({', '.join(f'`{e}`' for e in subject.edge_layers)}).\n"]),
             *([f"**Partial: {len(done)} of {total_rows} rows complete so far; the run resumes where it "
                "stopped.**\n"] if partial else []),
             f"Command: `{command}`. Measured on: {'; '.join(machines)}. Every (plan, seed) record in `report.csv` "
             "names the machine it ran on and its seconds.\n",
             f"Sampling: {subject.sampler.format(steps=s.steps)}, guidance {s.guidance:g}, N = {s.n:,} {subject.conditioning} samples "
             f"per seed, seeds 0–{s.seeds - 1}; every plan draws the same noise per seed as FP32, so every difference "
             "to FP32 below is **paired** (per seed, then mean ± the 95% Student-t half-width over seeds). "
             + ("No classifier ships with this model, so there is no FID, feature distance or class agreement: "
                "fidelity to FP32, image by image from the same noise, is mean |Δ| (‰ of the sample range, the "
                "model's output clamped to [−1, 1] and stored as 8 bits, as for images; for a latent model these are "
                "its latents, not decoded images) and PSNR. "
                if subject.pixels_only else
                f"FID backend **{backend}** ({subject.classifier}) against the held-out {subject.reference} "
                "reference. Fidelity to FP32, image by image from the same noise: mean |Δ| (‰ of the pixel range), "
                "PSNR, classifier-feature distance (% of the mean feature norm) and class agreement with FP32's "
                "image. ")
             + "Size: stored bytes per tensor "
             "plus scales (fp32 per channel; fp16 per group for int4-g32/-g64). Budget sweep: "
             f"{' / '.join(f'{b:g}' for b in s.budgets)} bits per weight, scales included"
             + (f"; the smallest allocation the budget can make takes {budget_floor_bits:.2f} bits, so no budget "
                "below that can be met" if budget_floor_bits else "") + ".\n"]
    if floor is not None:
        lines.append(f"Real-vs-real floor at the same backend and N ({floor.n:,} of {subject.floor_images} vs {subject.reference}, "
                     f"{len(floor.values)} draws): FID {floor.mean:.3f} ± {floor.ci95:.3f}.\n")
    # The columns this model has: a model that ships no classifier has no FID, features, agreement or accuracy.
    cols = [m for m in ("fid", "dfid", *FIDELITY, "accuracy") if any(math.isfinite(r[m]) for r in rows)] or ["mad"]
    heads = {"fid": "FID", "dfid": "ΔFID vs FP32 (paired)", "mad": "mean abs Δ ‰", "psnr": "PSNR dB",
             "feature_distance": "feature dist. %", "agreement": "class agreement %", "accuracy": "accuracy %"}
    lines += ["| plan | bytes | % of FP32 | bits/weight | " + " | ".join(heads[m] for m in cols) + " | seeds |",
              "|---|---:|---:|---:|" + "---:|" * (len(cols) + 1)]
    for r in rows:
        pm = lambda v, ci: _with_ci(v, ci, r["seeds"])  # noqa: E731

        def cell(m: str) -> str:
            if not math.isfinite(r[m]) or (r["name"] == "fp32" and m in FIDELITY):
                return "—"
            if m == "accuracy":
                return _fmt(m, r[m])
            if m in ("fid", "dfid"):
                return pm(format(r[m], ".3f" if m == "fid" else "+.3f"), format(r[m + "_ci95"], ".3f"))
            return pm(_fmt(m, r[m]), _fmt(m, r[m + "_ci95"]))
        lines.append(f"| {r['name']} | {r['bytes']:,} | {r['pct_of_fp32']:.2f} | {r['avg_bits']:.2f} | "
                     + " | ".join(cell(m) for m in cols) + f" | {r['seeds']} |")
    lines += ["", f"![size vs {'mean |Δ| to FP32' if subject.pixels_only else 'FID'}](report_pareto.svg)", "",
              "## What the data say", "", *findings(records, s), ""]
    lines += random_section(records, s)
    from .sensitivity import by_precision
    lines += sensitivity_section(sens, s, sensitivity_units, sensitivity_skipped,
                                 by_precision(sensitivity) if sensitivity else None)
    lines += source_section(records) if subject.source_strategies else []
    atomic_write_bytes(out_dir / "report.md", ("\n".join(lines) + "\n").encode())


HEAD_PROTECTING = (EDGE, *RECIPES, PINNED_ERROR)
SIZE_TOLERANCE = 0.001  # a recipe up to 0.1% larger counts as the budget's size: budgets at a recipe's size sit just under it


def recipe_verdicts(records: list[dict], s: Settings) -> list[str]:
    """Per size and per metric: the Fisher budget against the best head-protecting recipe at or below its size.
    'Best' is the recipe (first and last layers kept at a higher precision, or the error-only budget with the
    last layer pinned at FP16) with the lowest mean |Δ| among those measured on every seed whose bytes are at
    most the budget's (plus SIZE_TOLERANCE); every cell is the paired budget − recipe interval and its verdict,
    and class agreement also gets the exact McNemar test over images where the records keep them."""
    by = {r["name"]: r for r in summarize(records)}
    budgets = [f"budget @ {name} size" for name in (EDGE, *RECIPES)] + ["budget @ int4-g32 size"]
    done = [b for b in dict.fromkeys(budgets) if complete(by.get(b), s.seeds)]
    if not done:
        return []
    compared = []
    for b in sorted(done, key=lambda x: by[x]["bytes"]):
        cands = [r for r in HEAD_PROTECTING if complete(by.get(r), s.seeds)
                 and by[r]["bytes"] <= by[b]["bytes"] * (1 + SIZE_TOLERANCE)]
        if cands:
            best = min(cands, key=lambda r: by[r]["mad"])
            compared.append((b, best, compare(records, b, best), image_level(records, b, best)))
    if not compared:
        return []
    # Only the measures this model has (no classifier: no FID, features, agreement or class flips).
    metrics = [m for m in ("fid", "mad", "psnr", "feature_distance", "agreement") if any(m in c for _, _, c, _ in compared)]
    flips = any(t and "mcnemar_p" in t for *_, t in compared)
    out = ["", "Per size, the Fisher budget against the best head-protecting baseline at or below its size: of the "
           "recipes that keep the first and last layers at a higher precision and the error-only budget with the "
           "last layer pinned at FP16, the one with the lowest mean |Δ| among those within 0.1% of the budget's "
           "bytes or smaller; each cell is "
           f"budget − recipe, paired per seed (N = {s.n:,} × {s.seeds} seeds), and its verdict for the budget: better, "
           "worse, or none detectable (the 95% interval contains 0).", "",
           "| budget plan | bits | best head-protecting baseline at or below its size | "
           + " | ".join(DELTA_LABELS[m] for m in metrics) + (" | class flips (McNemar) |" if flips else " |"),
           "|---|---:|---|" + "---|" * (len(metrics) + flips)]
    for b, best, c, t in compared:
        short = lambda m: {"better": "better", "worse": "worse"}.get(verdict(m, c[m], s.n), "none detectable")  # noqa: E731
        cells = [f"{_sign(m, c[m][0])} ± {_fmt(m, c[m][1])}{UNITS[m]}: {short(m)}" if m in c else "—"
                 for m in metrics]
        if flips:
            cells.append(f"{t['kept_by_a_only']} vs {t['kept_by_b_only']}, p = {t['mcnemar_p']:.2g}"
                         if t and "mcnemar_p" in t else "—")
        out.append(f"| {b} | {by[b]['avg_bits']:.2f} | {best} ({by[best]['avg_bits']:.2f} bits) | "
                   + " | ".join(cells) + " |")
    return out


def findings(records: list[dict], s: Settings) -> list[str]:
    """The main question, answered from paired intervals only (no point estimates, no unequal sizes)."""
    by = {r["name"]: r for r in summarize(records)}
    fid = any(r.get("fid") is not None for r in records)
    out = ["Does the Fisher budget plan beat the strong simple baselines at equal size? Each line is the paired "
           "difference budget − baseline (same noise, per seed); negative is better for "
           + ("FID, mean |Δ| and feature distance, positive for agreement. FID and fidelity answer different "
              "questions: a plan can score a lower FID than FP32 itself while its images are further from FP32's, so "
              "'better' in FID means a lower FID against the real data, not closer to FP32; the fidelity terms "
              "measure closeness to FP32. Where both plans' records keep per-image values, a test over images follows "
              "the seed-level interval: the images on which only one plan keeps FP32's class (exact McNemar) and the "
              "per-image mean |Δ| (paired over images)." if fid else
              "mean |Δ|, positive for PSNR (both measure closeness to FP32's samples from the same noise). A test over "
              "samples follows the seed-level interval: the per-sample mean |Δ| (paired over samples).")]
    pairs = [(f"budget @ {EDGE} size", EDGE), ("budget @ int4-g32 size", G32),
             *[(f"budget @ {name} size", name) for name in RECIPES],
             ("budget @ int4-g32 size", "error-only budget @ int4-g32 size"),
             ("budget @ int4-g32 size", "magnitude budget @ int4-g32 size"),
             ("budget @ int4-g32 size", PINNED_ERROR), ("budget @ int4-g32 size", MEASURED),
             ("budget @ int4-g32 size", [n for n in by if by[n].get("control_of") == "budget @ int4-g32 size"]),
             *([(f"budget {min(s.budgets):g} bits", "uniform int4")] if s.budgets else [])]
    for a, b in pairs:
        if not isinstance(b, str):  # no verdict from part of the controls, nor from one
            planned = max((by[x].get("planned_controls") or s.random_seeds for x in b), default=s.random_seeds)
            if len(b) < max(planned, 2):
                out.append(f"- {a} vs its random controls: {len(b)} of {planned} measured so far.")
                continue
        elif b in by and not complete(by[b], s.seeds):
            out.append(f"- {a} vs {b}: not yet measured on every seed.")
            continue
        label = b if isinstance(b, str) else f"{len(b)} random controls at its size, each paired at its own seed"
        c = compare(records, a, b)
        if c is None or (a in by and by[a]["seeds"] < s.seeds):
            out.append(f"- {a} vs {label}: not yet measured.")
            continue
        size_note = ""
        if isinstance(b, str) and b in by:
            rel = 100 * (by[a]["bytes"] / by[b]["bytes"] - 1)
            size_note = f" (sizes {by[a]['bytes']:,} vs {by[b]['bytes']:,} bytes, {rel:+.2f}%)"
        images = image_level(records, a, b) if isinstance(b, str) else None
        out.append(f"- **{a}** vs {label}{size_note}: "
                   f"{describe_compare(c, s.n, 'seeds' if isinstance(b, str) else 'control runs')}"
                   + (f"; {describe_image_level(images, a, label)}" if images else "") + ".")
    out += recipe_verdicts(records, s)
    out += ["", "Closeness to FP32: for each plan below, " + ("the paired ΔFID and " if fid else "")
            + "the fidelity to FP32's images."]
    for name in ("uniform fp16", "uniform int8", "uniform int4", EDGE, G32, "budget @ int4-g32 size"):
        r = by.get(name)
        if r is None or r["seeds"] < s.seeds:
            continue
        zero = abs(r["dfid"]) <= r["dfid_ci95"]
        change = "no FID change detectable" if zero else "a detectable FID change"
        fid = (f"ΔFID {r['dfid']:+.3f} ± {r['dfid_ci95']:.3f} ({change} at N = {s.n:,}); "
               if math.isfinite(r["dfid"]) else "")
        agree = (f", class agreement {_fmt('agreement', r['agreement'])} ± {_fmt('agreement', r['agreement_ci95'])} %"
                 if math.isfinite(r["agreement"]) else "")
        out.append(f"- {name} ({r['avg_bits']:.2f} bits): {fid}mean |Δ| {_fmt('mad', r['mad'])} ± "
                   f"{_fmt('mad', r['mad_ci95'])} ‰{agree}.")
    return out


def random_section(records: list[dict], s: Settings) -> list[str]:
    rows = summarize(records)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("control_of"):
            groups.setdefault(r["control_of"], []).append(r)
    if not groups:
        return []
    out = ["## Random controls", "",
           "Each control is built up from the smallest allocation (INT4 matrices) with random tensors raised to "
           "random precisions from the plan's own set, to within 1% of the plan's size without passing it; "
           f"{s.random_seeds} seeds per plan, of which a seed that repeats an earlier seed's plan is dropped. Control "
           f"k samples once, from noise seed k mod {s.seeds}, and is paired with the plan at that seed: the interval "
           "spans both which tensors the controls raise and the noise. Spread: the lowest and highest control. The "
           "last layer's largest matrix (the output convolution or projection) is named for the plan and counted for "
           "its controls: the controls' fidelity falls into bands by that one tensor's format, so a control that "
           "leaves it at 4 bits tests that tensor more than the allocation.", "",
           "| plan | plan's last layer | controls' last layer | distinct controls measured | control size (% of plan) | "
           "control FID, min–max | control mean abs Δ ‰, min–max | plan − control: ΔFID (paired) | "
           "Δ mean abs Δ ‰ (paired) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    by = {r["name"]: r for r in rows}
    for plan, ctrls in groups.items():
        if plan not in by:
            continue
        sizes = [100 * c["bytes"] / by[plan]["bytes"] for c in ctrls]
        planned = ctrls[0].get("planned_controls") or s.random_seeds
        c = compare(records, plan, [x["name"] for x in ctrls])
        d = (("— | " if "fid" not in c else f"{_sign('fid', c['fid'][0])} ± {c['fid'][1]:.3f} | ")
             + f"{_sign('mad', c['mad'][0])} ± {_fmt('mad', c['mad'][1])}"
             if c and c["mad"][2] >= 2 and len(ctrls) >= planned else "— | —")  # no interval from one pair
        fids = [x["fid"] for x in ctrls if math.isfinite(x["fid"])]
        last = Counter(x.get("last_layer") or "?" for x in ctrls)
        lasts = ", ".join(f"{p} ×{k}" for p, k in sorted(last.items()))
        out.append(f"| {plan} | {by[plan].get('last_layer') or '?'} | {lasts} | {len(ctrls)} of {planned} | "
                   f"{min(sizes):.2f}–{max(sizes):.2f} | "
                   + (f"{min(fids):.3f}–{max(fids):.3f} | " if fids else "— | ")
                   + f"{_fmt('mad', min(x['mad'] for x in ctrls))}–{_fmt('mad', max(x['mad'] for x in ctrls))} | {d} |")
    return out + [""]


SENS_LABELS = {"mad": "mean abs Δ", "feature_distance": "feature distance"}


def sensitivity_section(sens: dict | None, s: Settings, total_units: int | None = None,
                        skipped: bool = False, per_precision: dict | None = None) -> list[str]:
    if not sens:
        return ["## Sensitivity validation", "",
                "Not part of this run (`--skip-sensitivity`)." if skipped else "Not yet measured.", ""]
    ss = s.sensitivity
    out = ["## Sensitivity validation", "",
           *([f"**Partial: {sens['units']} of {total_units} {ss.unit}s measured so far.**", ""]
             if total_units and sens["units"] < total_units else []),
           f"Each of {sens['units']} {ss.unit}s lowered alone to {ss.precision.upper()} (everything else FP32); damage "
           f"measured as the paired fidelity loss to FP32 (N = {ss.n} per seed, {sens['seeds']} seeds, DDIM-{ss.steps}, "
           f"guidance {s.guidance:g}; per-seed values in `sensitivity.csv`). Spearman ρ of each predictor with the "
           "measured damage (p-value in brackets); random: the mean and 95% band of ρ over "
           "100 random predictors.", "",
           "| predictor | " + " | ".join(f"ρ vs {SENS_LABELS[m]}" for m in sens["measures"]) + " |",
           "|---|" + "---:|" * len(sens["measures"])]
    names = {"fisher": "Fisher (per-element mean over timesteps)", "fisher_x_error": "Fisher × ‖Q(w) − w‖² (budget's)",
             "error": "‖Q(w) − w‖² alone", "magnitude": "weight magnitude (mean abs w)"}
    for p, label in names.items():
        cells = [f"{sens['measures'][m]['rho'][p][0]:+.3f} (p = {sens['measures'][m]['rho'][p][1]:.2g})"
                 for m in sens["measures"]]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{r[0]:+.3f} [{r[1]:+.2f}, {r[2]:+.2f}]" for r in (v["random"] for v in sens["measures"].values())]
    out.append("| random | " + " | ".join(cells) + " |")
    top = sorted(sens["measures"]["mad"]["measured"].items(), key=lambda kv: -kv[1])[:5]
    out += ["", "Most damaging alone (mean abs Δ ‰): " + ", ".join(f"`{u}` {1000 * v:.2f}" for u, v in top) + ".",
            "", "![measured damage vs predicted](sensitivity.svg)", ""]
    others = {p: v for p, v in (per_precision or {}).items() if p != ss.precision and v}
    if others:
        out += [f"At the other precisions a budget plan puts tensors at, each unit lowered alone to that precision "
                "(same setting): Spearman ρ against the measured mean |Δ| (p-value in brackets).", "",
                "| precision | units | Fisher × ‖Q(w) − w‖² (budget's) | Fisher alone | ‖Q(w) − w‖² alone | most damaging "
                "alone (mean abs Δ ‰) |", "|---|---:|---:|---:|---:|---|"]
        for p, v in others.items():
            rho = v["measures"]["mad"]["rho"]
            top = sorted(v["measures"]["mad"]["measured"].items(), key=lambda kv: -kv[1])[:3]
            out.append(f"| {p.upper()} | {v['units']} | " + " | ".join(
                f"{rho[k][0]:+.3f} (p = {rho[k][1]:.2g})" for k in ("fisher_x_error", "fisher", "error"))
                + " | " + ", ".join(f"`{u}` {1000 * d:.2f}" for u, d in top) + " |")
        out.append("")
    return out


def source_section(records: list[dict]) -> list[str]:
    by = {r["name"]: r for r in summarize(records)}
    out = ["## The source's table beside ours", "",
           "The source system (LAQFI: a DDPM U-Net on MNIST, Fisher per layer × timestep, FP16 below thresholds) "
           "reports single runs with Inception FID. Our FIDs use another backend and model, so compare the "
           "*differences*: ours are paired over seeds with 95% intervals; the source's are differences of single runs.",
           "", "| strategy | source: FID | source: % smaller | ours: % smaller | ours: ΔFID vs FP32 (paired) | "
           "ours: mean abs Δ ‰ | ours: class agreement % |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (fid, smaller) in SOURCE_TABLE.items():
        r = by.get(name)
        if r is None:
            ours = "— | — | — | —"
        elif not complete(r):  # no interval from part of the seeds
            ours = (f"{100 - r['pct_of_fp32']:.1f} | {r['dfid']:+.3f} ({r['seeds']} of {r['planned_seeds']} seeds) | "
                    f"{_fmt('mad', r['mad'])} | {_fmt('agreement', r['agreement'])}")
        else:
            ours = (f"{100 - r['pct_of_fp32']:.1f} | {r['dfid']:+.3f} ± {r['dfid_ci95']:.3f} | "
                    + ("— | —" if name == "fp32" else f"{_fmt('mad', r['mad'])} ± {_fmt('mad', r['mad_ci95'])} | "
                       f"{_fmt('agreement', r['agreement'])}"))
        out.append(f"| {SOURCE_LABELS[name]} | {fid:.2f} | {smaller:.1f} | {ours} |")
    out += ["", "The source's claims, as measured here:"]
    u16 = by.get("uniform fp16")
    if complete(u16):
        lo, hi = u16["dfid"] - u16["dfid_ci95"], u16["dfid"] + u16["dfid_ci95"]
        what = ("no change detectable" if lo <= 0 <= hi else
                "a detectable increase, as in the source" if lo > 0 else
                "a detectable decrease (the source measured an increase)")
        out.append(f"- Uniform FP16 costs FID (source: 22.75 → 24.13, +6%): ours ΔFID {u16['dfid']:+.3f} ± "
                   f"{u16['dfid_ci95']:.3f} paired, {what} at N = {u16['n']:,} × {u16['seeds']} seeds.")
    c = compare(records, "layer-ratio fp16", "uniform fp16")
    if c and complete(u16) and complete(by.get("layer-ratio fp16")):
        out.append(f"- Ratio p = 0.25 is up to 7% better in FID than uniform FP16 (source: 22.42 vs 24.13): ours "
                   f"layer-ratio − uniform FP16 ΔFID {c['fid'][0]:+.3f} ± {c['fid'][1]:.3f} paired "
                   f"({verdict('fid', c['fid'], u16['n'])}); Δ mean abs Δ "
                   f"{_sign('mad', c['mad'][0])} ± {_fmt('mad', c['mad'][1])} ‰.")
    missing = [SOURCE_LABELS[n] for n in SOURCE_TABLE if n != "fp32" and not complete(by.get(n))]
    if missing:
        out.append(f"- Not measured on every seed yet: {', '.join(missing)}; no verdict for them.")
    out.append("- Our groups strategy keeps the encoder (embed, stem, down1–3) FP32 and lowers the middle and decoder; "
               "the source's 12|3456 split may group layers differently.")
    return out + [""]


# -- figures (dependency-free SVG) ---------------------------------------------------------------

def scatter_svg(points: list[tuple[float, float, str, str]], xlabel: str, ylabel: str, *, logx=False, logy=False,
                errors: list[float] | None = None, legend: list[tuple[str, str]] = (), title: str = "",
                width: int = 720, height: int = 440) -> str:
    """(x, y, color, title) points, optional y error bars, linear or log axes, as an SVG string."""
    pad = 64
    tx = (lambda v: math.log10(max(v, 1e-30))) if logx else (lambda v: v)
    ty = (lambda v: math.log10(max(v, 1e-30))) if logy else (lambda v: v)
    xs = [tx(p[0]) for p in points] or [0.0, 1.0]
    lo_y = [ty(p[1] - (errors[i] if errors else 0)) if not logy else ty(p[1]) for i, p in enumerate(points)] or [0.0]
    hi_y = [ty(p[1] + (errors[i] if errors else 0)) if not logy else ty(p[1]) for i, p in enumerate(points)] or [1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(lo_y), max(hi_y)
    x0, x1 = (x0 - 0.05 * (x1 - x0 or 1), x1 + 0.05 * (x1 - x0 or 1))
    y0, y1 = (y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1))

    def px(v):
        return pad + (v - x0) / (x1 - x0) * (width - 2 * pad)

    def py(v):
        return height - pad - (v - y0) / (y1 - y0) * (height - 2 * pad)

    def tick(v, log):
        return f"1e{v:.0f}" if log else f"{v:.3g}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 18}" text-anchor="middle">{xlabel}</text>',
             f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">{ylabel}</text>',
             f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="13">{title}</text>']
    for k in range(5):
        vx, vy = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        if logx:
            vx = round(vx)
        if logy:
            vy = round(vy)
        if x0 <= vx <= x1:
            parts.append(f'<text x="{px(vx)}" y="{height - pad + 15}" text-anchor="middle">{tick(vx, logx)}</text>')
        if y0 <= vy <= y1:
            parts.append(f'<text x="{pad - 5}" y="{py(vy) + 4}" text-anchor="end">{tick(vy, logy)}</text>')
    for i, (x, y, c, title) in enumerate(points):
        if errors and not logy:
            parts.append(f'<line x1="{px(tx(x))}" x2="{px(tx(x))}" y1="{py(y - errors[i])}" y2="{py(y + errors[i])}" '
                         f'stroke="{c}"/>')
        parts.append(f'<circle cx="{px(tx(x)):.1f}" cy="{py(ty(y)):.1f}" r="4" fill="{c}"><title>{title}</title></circle>')
    for i, (label, c) in enumerate(legend):
        parts.append(f'<circle cx="{width - pad - 150}" cy="{pad + 14 * i}" r="4" fill="{c}"/>'
                     f'<text x="{width - pad - 140}" y="{pad + 14 * i + 4}">{label}</text>')
    return "\n".join(parts + ["</svg>"])


KIND_COLORS = {"reference": "#1f77b4", "uniform": "#2ca02c", "baseline": "#9467bd", "budget": "#d62728",
               "signal": "#8c564b", "source": "#ff7f0e", "random": "#999999"}


def pareto_svg(rows: list[dict]) -> str:
    """Size (% of FP32) vs FID with 95% intervals, one color per kind of row (mean |Δ| to FP32 where there is no
    FID: a model that ships no classifier)."""
    m = "fid" if rows and math.isfinite(rows[0]["fid"]) else "mad"
    scale = 1 if m == "fid" else 1000
    pts = [(r["pct_of_fp32"], scale * r[m], KIND_COLORS.get(r.get("kind"), "#000"), f"{r['name']}: {scale * r[m]:.3f}")
           for r in rows]
    return scatter_svg(pts, "size, % of FP32", "FID (lower is better)" if m == "fid" else
                       "mean |Δ| to FP32, ‰ (lower is better)", errors=[scale * r[f"{m}_ci95"] for r in rows],
                       legend=list(KIND_COLORS.items()))


def sensitivity_svg(sens: dict) -> str:
    """Measured damage (mean |Δ|, one unit lowered) vs the budget's predicted damage, log-log."""
    m = sens["measures"]["mad"]
    preds = sens["predicted"]["fisher_x_error"]
    pts = [(preds.get(u, 0.0), v, "#d62728", f"{u}: {1000 * v:.3f} ‰") for u, v in m["measured"].items()
           if preds.get(u, 0) > 0 and v > 0]
    rho, p = m["rho"]["fisher_x_error"]
    return scatter_svg(pts, "predicted damage Σ F·‖Q(w) − w‖² (log)", "measured mean |Δ| to FP32 (log)",
                       logx=True, logy=True, title=f"each of {sens['units']} tensors alone at INT4: Spearman ρ = "
                                                   f"{rho:+.2f} (p = {p:.1g})")


def settings_with(s: Settings, **kw) -> Settings:
    return replace(s, **{k: v for k, v in kw.items() if v is not None})
