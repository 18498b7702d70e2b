"""How far measured damage is from additive: pairs of a model's most damaging tensors lowered together.

    python scripts/additivity.py [--model checkpoints/dit] [--top 5] [--precision int4] [--out DIR/report/additivity.md]

The budget's objective adds one score per tensor, Σ F·‖Q(w) − w‖², a proxy for squared error. This measures, on
the report's sensitivity setting (N = 64 images per seed, 3 seeds, DDIM-20, guidance 1.5, paired with FP32
from the same noise; records shared with `report --model DIR`'s sensitivity stage, so the single tensors are not
sampled again), the mean squared error to FP32's images of each of the `--top` most damaging tensors alone and of
every pair of them lowered together. Additive in squared error means MSE(a+b) = MSE(a) + MSE(b); the table gives
the paired excess MSE(a+b) − MSE(a) − MSE(b) per pair (mean ± 95% Student-t over seeds) and the ratio of the means.
MSE per seed is recovered from the record's PSNR (10·log10(1 / MSE) on the 0..1 scale over all pixels).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lafq.checkpoint import atomic_write_bytes  # noqa: E402
from lafq.evaluate import machine  # noqa: E402
from lafq.metrics import mean_ci95  # noqa: E402
from lafq.pipeline import SampleSpec  # noqa: E402
from lafq.sensitivity import SensitivitySettings, unit_plan  # noqa: E402


def mse(record: dict) -> float:
    return 10 ** (-record["psnr"] / 10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None,
                    help="a pipeline folder whose report's sensitivity stage has run (default: the MNIST U-Net)")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    from lafq.cli import build_parser
    from lafq.cli_quant import _report_subject
    from lafq.evaluate import Evaluator
    from lafq.policy import param_shapes
    from lafq.report import read_csv

    from lafq import paths

    args = build_parser().parse_args(["report", *(["--model", a.model] if a.model else [])])
    sub = _report_subject(args)
    s = SensitivitySettings()
    report_dir = Path(a.model) / "report" if a.model else paths.DOCS
    sens = [r for r in read_csv(report_dir / "sensitivity.csv") if (r.get("precision") or "int4") == a.precision]
    damage: dict[str, list[float]] = {}
    for r in sens:
        damage.setdefault(r["unit"], []).append(r["mad"])
    top = sorted(damage, key=lambda u: -sum(damage[u]) / len(damage[u]))[:a.top]
    ev = Evaluator(sub.den or sub.model, sub.classifier, None, sub.cache / "full" / "sensitivity", **sub.evaluator)
    shapes = param_shapes(sub.model)
    specs = [SampleSpec(n=s.n, steps=s.steps, guidance=1.5, seed=k, batch_size=128) for k in range(s.seeds)]

    def measure(units: list[str]) -> list[float]:
        plan = unit_plan(shapes, units, a.precision)
        return [mse(ev.record(" + ".join(units), plan, spec)) for spec in specs]

    single = {u: measure([u]) for u in top}
    rows = []
    for u, v in itertools.combinations(top, 2):
        both = measure([u, v])
        excess = [ab - x - y for ab, x, y in zip(both, single[u], single[v])]
        rows.append({"a": u, "b": v, "mse_a": single[u], "mse_b": single[v], "mse_ab": both, "excess": excess})
        print(u, v, [round(1e4 * e, 3) for e in excess], flush=True)
    write(rows, a, report_dir, s)


def write(rows, a, report_dir: Path, s):
    out = a.out or report_dir / "additivity.md"
    cmd = (f"python scripts/additivity.py{' --model ' + a.model if a.model else ''} --top {a.top} "
           f"--precision {a.precision}")

    def ci(v, scale=1e4):
        m, h = mean_ci95(v)
        return f"{scale * m:+.2f} ± {scale * h:.2f}"

    lines = ["# Is the measured damage additive? Pairs of the most damaging tensors", "",
             f"Command: `{cmd}`. Measured on: {machine()}. Each of the {a.top} tensors that damage the model most "
             f"when lowered alone to {a.precision.upper()} (the report's sensitivity stage), alone and in every pair, "
             f"everything else FP32; N = {s.n} images per seed, seeds 0–{s.seeds - 1}, DDIM-{s.steps}, guidance 1.5, "
             "paired with FP32 from the same noise. MSE to FP32's images on the 0..1 scale (× 10⁴), from each "
             "record's PSNR. Excess = MSE(both) − MSE(a) − MSE(b), paired per seed (mean ± 95% Student-t): 0 is "
             "additive, what the budget's objective assumes; ratio = mean MSE(both) / (mean MSE(a) + mean MSE(b)).", "",
             "| a | b | MSE a × 10⁴ | MSE b × 10⁴ | MSE both × 10⁴ | excess × 10⁴ (paired) | ratio | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    def ratio(r):
        return sum(r["mse_ab"]) / (sum(r["mse_a"]) + sum(r["mse_b"]))

    for r in rows:
        m, h = mean_ci95(r["excess"])
        verdict = "additive within the interval" if abs(m) <= h else ("super-additive" if m > 0 else "sub-additive")
        lines.append(f"| `{r['a']}` | `{r['b']}` | {1e4 * sum(r['mse_a']) / len(r['mse_a']):.2f} | "
                     f"{1e4 * sum(r['mse_b']) / len(r['mse_b']):.2f} | {1e4 * sum(r['mse_ab']) / len(r['mse_ab']):.2f} | "
                     f"{ci(r['excess'])} | {ratio(r):.2f} | {verdict} |")
    ratios = [ratio(r) for r in rows]
    lines += ["", f"Ratio over the {len(rows)} pairs: {min(ratios):.2f}–{max(ratios):.2f} (1 = additive). Per-seed "
              f"values: `{out.with_suffix('.json').name}`.", ""]
    atomic_write_bytes(out, "\n".join(lines).encode())
    atomic_write_bytes(out.with_suffix(".json"), json.dumps({"rows": rows, "command": cmd, "machine": machine()},
                                                            indent=1).encode())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
