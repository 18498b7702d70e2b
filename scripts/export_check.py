"""What a plan's torchao export does to a model: fidelity to FP32 and to lafq's own quantized model, bytes, latency.

    python scripts/export_check.py --model checkpoints/dit [--n 200] [--steps 20] [--seeds 3] [--reps 5]
                                   [--bits 8,4.5] [--out DIR/report/export.md]

For uniform INT8 and the Fisher budget plan at each `--bits`: the plan is exported to torchao
(`lafq.export.export_plan`, `IntxWeightOnlyConfig` for int4: it runs on the CPU) and applied with
`quantize_(copy, config, filter_fn=None)` to a copy of the model's FP32 denoiser. torchao converts nn.Linear only,
so the plan *as exported* keeps every other tensor in FP32; lafq's model of that same restricted plan is sampled
beside it. Each variant is sampled from FP32's noise (N images per seed, DDIM, the model's guidance; paired) and
scored by mean |Δ| to FP32's images (‰ of the pixel range, mean ± 95% Student-t over seeds); "torchao vs lafq" is
the mean |Δ| between torchao's images and lafq's images of the exported plan: how faithfully torchao reproduces
lafq's rounding. Latency: seconds per guided denoising step at batch 64 (the model's guidance doubles the forward
batch), each variant timed in interleaved repeats (A, B, C, A, B, C, ...) after a warm-up, reported as the median
ratio to FP32 over repeats with its min..max. Writes a markdown table and the per-seed values beside it (.json).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lafq.checkpoint import atomic_write_bytes  # noqa: E402
from lafq.evaluate import machine  # noqa: E402
from bench.harness import interleaved_times, paired_ratios  # noqa: E402
from lafq.metrics import fidelity, mean_ci95  # noqa: E402
from lafq.pipeline import DEFAULT_GUIDANCE, SampleSpec, generate  # noqa: E402
from lafq.policy import Plan, Policy, make_plan, param_shapes  # noqa: E402
from lafq.quantize import quantize, size_report  # noqa: E402


def exported_plan(plan: Plan, converted: dict[str, str]) -> Plan:
    """The plan as the export applies it: the converted modules' weights at their precision, the rest FP32."""
    keep = {f"{m}.weight" if m else "weight" for m in converted}
    return Plan({n: (p if n in keep else "fp32") for n, p in plan.precisions.items()}, plan.policy)


def saved_bytes(module: torch.nn.Module) -> int:
    """Bytes of `torch.save(module.state_dict())`: what the library really stores (torchao keeps int4 codes
    unpacked, one per int8), not what the plan says."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


def lafq_file_bytes(module: torch.nn.Module) -> int:
    """Bytes of lafq's own .safetensors file of a quantized model (packed codes, scales, metadata)."""
    from lafq.quantize import save_quantized

    with tempfile.TemporaryDirectory() as d:
        save_quantized(Path(d) / "q.safetensors", module)
        return (Path(d) / "q.safetensors").stat().st_size


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return fidelity(b, a, None).mad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a pipeline folder with fisher.safetensors")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--timing-steps", type=int, default=5)
    ap.add_argument("--bits", default="8,4.5", help="Fisher budget plans, average bits per weight")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    import lafq
    from torchao.quantization import quantize_

    from lafq.export import export_plan
    from lafq.fisher import FisherMap

    folder = Path(a.model)
    den = lafq.load(folder)
    fisher = FisherMap.load(folder / "fisher.safetensors")
    weights = dict(den.module.named_parameters())
    shapes = param_shapes(den.module)
    plans = {"uniform INT8": make_plan(Policy(strategy="uniform", target="int8"), fisher, weights)}
    for b in (float(x) for x in a.bits.split(",")):
        plans[f"Fisher budget {b:g} bits"] = make_plan(Policy(strategy="budget", avg_bits=b, statistic="mean"),
                                                       fisher, weights)
    guidance = DEFAULT_GUIDANCE
    specs = [SampleSpec(n=a.n, steps=a.steps, seed=k, guidance=guidance) for k in range(a.seeds)]
    gen = lambda module, spec: generate(replace(den, module=module), spec)[0]  # noqa: E731
    t0 = time.perf_counter()
    ref = [gen(den.module, s) for s in specs]
    rows, timed = [], {"FP32": den.module}
    for name, plan in plans.items():
        ex = export_plan(plan, den.module, "torchao")
        restricted = exported_plan(plan, ex.converted)
        ours = quantize(copy.deepcopy(den.module), restricted)
        ao = copy.deepcopy(den.module)
        quantize_(ao, ex.config, filter_fn=None)
        full = quantize(copy.deepcopy(den.module), plan)
        per = {"lafq, whole plan": [], "lafq, as exported": [], "torchao": [], "torchao vs lafq": []}
        for s, r in zip(specs, ref):
            img_full, img_ours, img_ao = gen(full, s), gen(ours, s), gen(ao, s)
            per["lafq, whole plan"].append(mad(img_full, r))
            per["lafq, as exported"].append(mad(img_ours, r))
            per["torchao"].append(mad(img_ao, r))
            per["torchao vs lafq"].append(mad(img_ao, img_ours))
        print(name, {k: [round(1000 * x, 2) for x in v] for k, v in per.items()}, flush=True)
        linear = sum(1 for m in den.module.modules() if isinstance(m, torch.nn.Linear))
        rows.append({"plan": name, "plan_bytes": size_report(plan, shapes).total_bytes,
                     "exported_bytes": size_report(restricted, shapes).total_bytes,
                     "lafq_file_bytes": lafq_file_bytes(ours), "torchao_saved_bytes": saved_bytes(ao),
                     "fp32_saved_bytes": saved_bytes(den.module), "converted": len(ex.converted),
                     "linear_modules": linear, "not_converted": len(ex.not_converted), "mad": per})
        timed[f"{name}: lafq"] = ours
        timed[f"{name}: torchao"] = ao
        if all(p in ("fp32", "int8") for p in restricted.precisions.values()):
            timed[f"{name}: lafq int8-dynamic"] = quantize(copy.deepcopy(den.module), restricted, "int8-dynamic")
    sample_seconds = time.perf_counter() - t0
    tspec = SampleSpec(n=a.batch, steps=a.timing_steps, seed=0, guidance=guidance)
    with torch.inference_mode():
        runs = interleaved_times({k: (lambda m=m: gen(m, tspec)) for k, m in timed.items()}, a.reps)
    times = {k: [t / a.timing_steps for t in v] for k, v in runs.items()}
    write(rows, times, a, folder, guidance, sample_seconds)


def write(rows, times, a, folder: Path, guidance: float, sample_seconds: float):
    out = a.out or folder / "report" / "export.md"
    base = times["FP32"]

    def ratio(k):
        r = paired_ratios(times[k], base)
        return f"{statistics.median(r):.2f}× ({min(r):.2f}–{max(r):.2f})"

    def cell(v):
        m, h = mean_ci95(v)
        return f"{1000 * m:.2f} ± {1000 * h:.2f}"

    cmd = (f"python scripts/export_check.py --model {a.model} --n {a.n} --steps {a.steps} --seeds {a.seeds} "
           f"--reps {a.reps} --bits {a.bits}")
    lines = ["# torchao export: fidelity, bytes and latency", "",
             f"Command: `{cmd}`. Measured on: {machine()}, torchao "
             f"{__import__('torchao').__version__}. Sampling: DDIM-{a.steps}, guidance {guidance:g}, N = {a.n} "
             f"class-balanced images per seed, seeds 0–{a.seeds - 1}, every variant from FP32's noise (paired); mean "
             "|Δ| in ‰ of the pixel range, mean ± 95% Student-t over seeds. torchao converts nn.Linear only: \"as "
             "exported\" is the plan with every other tensor at FP32, the model torchao's export gives; \"torchao vs "
             "lafq\" compares torchao's images with lafq's of that same plan.", "",
             "| plan | bytes: plan / as exported (lafq's file) / torchao's saved state dict | Linear modules converted | mean abs Δ ‰: lafq, "
             "whole plan | lafq, as exported | torchao | torchao vs lafq |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["mad"]
        lines.append(f"| {r['plan']} | {r['plan_bytes']:,} / {r['exported_bytes']:,} ({r['lafq_file_bytes']:,}) / "
                     f"{r['torchao_saved_bytes']:,} (FP32 {r['fp32_saved_bytes']:,}) | {r['converted']} of {r['linear_modules']} | {cell(m['lafq, whole plan'])} "
                     f"| {cell(m['lafq, as exported'])} | {cell(m['torchao'])} | {cell(m['torchao vs lafq'])} |")
    lines += ["", f"Latency per guided step (batch {a.batch}, the forward batch {2 * a.batch} with guidance; "
              f"{a.timing_steps}-step jobs, {a.reps} interleaved repeats; FP32 median "
              f"{1000 * statistics.median(base):.1f} ms). lafq's own models dequantize once per call and run "
              "FP32 matmuls (its storage, not its speed, is the point there); `int8-dynamic` runs torch's int8 "
              "kernels on the Linear layers.", "", "| variant | time per step vs FP32: median (min–max) |", "|---|---:|"]
    lines += [f"| {k} | {ratio(k)} |" for k in times if k != "FP32"]
    lines += ["", f"Sampling for the fidelity columns took {sample_seconds:.0f} s. Per-seed values and every repeat's "
              f"seconds: `{out.with_suffix('.json').name}`.", ""]
    atomic_write_bytes(out, "\n".join(lines).encode())
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(
        {"rows": rows, "seconds_per_step": times, "n": a.n, "steps": a.steps, "guidance": guidance,
         "machine": machine(), "command": cmd}, indent=1).encode())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
