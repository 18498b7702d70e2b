"""`python -m lafq bench`: speed measured side by side, with the machine it ran on.

The harness lives beside the library, not in it (an installed `lafq` does not carry it): run it
from a checkout, where `python -m lafq bench` finds it.

Each comparison runs its variants interleaved (A, B, A, B, ...) in this process and reports
medians, so a background load slows every variant alike. Sections:
    sampling    our DDIM sampler vs diffusers (UNet2DModel + DDIMScheduler) on the same job; the ratio is
                the median of per-repeat ratios (each repeat runs both back to back) with its min..max;
                achieved FLOP/s as a fraction of a matmul peak measured in the same run; a torch.profiler
                breakdown by op kind (convolution, GroupNorm, SiLU, ...) for both, in ms per step
    compile     torch.compile's first-call overhead in a process with an empty compile cache and in a
                second process that finds the first one's cache (lafq/compile_cache.py)
    fisher      a bins x samples Fisher map: layer hooks vs torch.func.vmap vs a naive loop
    fid         feature extraction + statistics + distance for N images, per backend
    quantized   latency per image, peak resident memory and fidelity to FP32 per precision plan and
                compute mode (dequantize, int8-dynamic kernels, bf16 compute)
    app         cold start and the Compare tab's default job (bench/app_bench.py)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from lafq import paths
from lafq.diffusion import ddim_sample, linear_schedule

REPO = paths.REPO
SECTIONS = ("sampling", "compile", "fisher", "fisher-diffusers", "fid", "quantized", "app")
# --quick leaves out "compile": an empty cache costs a 46-100 s compile on 2 cores (ask for it with --only).
QUICK_SECTIONS = tuple(x for x in SECTIONS if x != "compile")

# Guidance != 1 runs both branches in one batched forward: the cost the recorded numbers and FLOP counts assume.
GUIDANCE = 2.0


@dataclass(frozen=True)
class BenchSettings:
    batch: int = 64  # images per sampling job (guidance doubles the forward batch)
    steps: int = 50  # DDIM steps
    reps: int = 5  # interleaved repeats of each sampling variant (the ratio is their median)
    fisher_bins: int = 50
    fisher_samples: int = 64
    fid_ns: tuple[int, ...] = (1000, 5000)
    latency_reps: int = 5
    compile: bool = True  # also time torch.compile'd sampling (its compile time is reported apart)
    app_runs: int = 3
    fidelity_n: int = 100  # images per plan compared with FP32's from the same noise
    fidelity_steps: int = 20

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(steps=5, reps=5, fisher_bins=3, fisher_samples=16, fid_ns=(1000,), latency_reps=5, compile=False,
                   app_runs=2, fidelity_n=40, fidelity_steps=10)


def machine() -> dict:
    from lafq.device import machine_info

    return machine_info()


def interleaved_times(variants: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of every repeat per variant, running them A, B, C, A, B, C, ... after one warm-up each."""
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def interleaved(variants: dict, reps: int) -> dict[str, float]:
    """Median seconds per variant, running them A, B, C, A, B, C, ... after one warm-up each."""
    return {k: statistics.median(v) for k, v in interleaved_times(variants, reps).items()}


def paired_ratios(slow: list[float], fast: list[float]) -> list[float]:
    """slow[i] / fast[i]: each repeat ran both back to back, so a load spike hits a pair, not one side."""
    return [a / b for a, b in zip(slow, fast)]


# Op kinds of the profile breakdown: the first pattern an op's name contains decides (aten names).
OP_KINDS = (("convolution", ("convolution", "conv2d")), ("group norm", ("group_norm",)), ("silu", ("silu",)),
            ("attention", ("attention", "bmm", "softmax")), ("linear", ("addmm", "aten::mm", "linear")),
            ("concatenation", ("aten::cat",)), ("upsample", ("upsample",)),
            ("copies / layout", ("copy_", "clone", "contiguous")),
            ("elementwise (adds, guidance, scheduler)", ("add", "sub", "mul", "div", "clamp", "sqrt", "where")))


def op_breakdown(fn, steps: int) -> dict[str, float]:
    """Self CPU ms per denoising step of one call of fn, grouped into OP_KINDS (rest: 'other');
    'python + dispatch' is wall time not spent in any aten op."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall_us = (time.perf_counter() - t0) * 1e6
    out = {k: 0.0 for k, _ in OP_KINDS}
    out["other ops"] = 0.0
    total = 0.0
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        total += e.self_cpu_time_total
        kind = next((k for k, pats in OP_KINDS if any(p in e.key for p in pats)), "other ops")
        out[kind] += e.self_cpu_time_total
    out["python + dispatch"] = max(wall_us - total, 0.0)
    return {k: v / 1000 / steps for k, v in out.items()}


def matmul_peak(size: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a large fp32 matmul: the practical ceiling for this machine's dense compute."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    sec = interleaved({"mm": lambda: a @ b}, reps)["mm"]
    return 2 * size ** 3 / sec


def forward_flops(model, batch: int, num_classes: int = 10) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.randn(batch, 1, 28, 28), torch.randint(0, 1000, (batch,))
    y = torch.randint(0, num_classes + 1, (batch,))
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(x, t, y)
    return fc.get_total_flops()


# -- sampling ---------------------------------------------------------------------------------

def diffusers_unet():
    """A class-conditional UNet2DModel shaped like ours (818,745 vs 828,641 parameters)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 48, 56),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8, num_class_embeds=11,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")).eval()


@torch.inference_mode()
def diffusers_sample(unet, n: int, steps: int, guidance: float = GUIDANCE, seed: int = 0):
    """The diffusers way of doing our job: DDIMScheduler, batched classifier-free guidance."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=gen)
    y = torch.arange(n) % 10
    labels = torch.cat([y, torch.full_like(y, 10)])
    for t in sched.timesteps:
        eps_c, eps_u = unet(torch.cat([x, x]), t, class_labels=labels).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x, eta=0.0).prev_sample
    return x


def bench_sampling(model, s: BenchSettings) -> dict:
    import copy

    schedule = linear_schedule()
    labels = torch.arange(s.batch) % 10
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)

    import lafq.model

    def ours(m, fast: bool = True):
        def job():
            lafq.model.FAST_INFERENCE = fast
            try:
                return ddim_sample(m, schedule, s.batch, labels=labels, steps=s.steps, guidance=GUIDANCE,
                                   generator=torch.Generator().manual_seed(0))
            finally:
                lafq.model.FAST_INFERENCE = True
        return job

    # "without CPU fast paths": lafq.model.FAST_INFERENCE off (no transposed conv for upsampling, no chunked tail).
    variants = {"lafq": ours(model), "lafq, without CPU fast paths": ours(model, fast=False),
                "lafq, NCHW layout": ours(nchw)}
    compile_s = None
    if s.compile:
        from lafq.compile_cache import compile_model

        compiled = compile_model(model)
        t0 = time.perf_counter()
        ours(compiled)()
        compile_s = time.perf_counter() - t0  # first call: compilation plus one job
        variants["lafq + torch.compile"] = ours(compiled)
    try:
        dunet = diffusers_unet()
        dunet_cl = copy.deepcopy(dunet).to(memory_format=torch.channels_last)
        variants["diffusers"] = lambda: diffusers_sample(dunet, s.batch, s.steps)
        variants["diffusers, channels-last"] = lambda: diffusers_sample(dunet_cl, s.batch, s.steps)
        diffusers_params = sum(p.numel() for p in dunet.parameters())
    except ImportError:
        diffusers_params = None
    cpu = {k: [] for k in variants}

    def cpu_timed(k, fn):  # process CPU seconds: what a variant costs even when other jobs take turns on the cores
        def run():
            c0 = time.process_time()
            fn()
            cpu[k].append(time.process_time() - c0)
        return run
    times = interleaved_times({k: cpu_timed(k, fn) for k, fn in variants.items()}, s.reps)
    cpu = {k: v[1:] for k, v in cpu.items()}  # drop the warm-up call
    sec = {k: statistics.median(v) for k, v in times.items()}
    peak = matmul_peak()
    flops = forward_flops(model, 2 * s.batch) * s.steps
    ips = {k: s.batch / v for k, v in sec.items()}
    out = {"job": f"DDIM-{s.steps}, batch {s.batch}, guidance {GUIDANCE} (batched), FP32",
           "images_per_s": ips, "seconds": sec, "params": {"lafq": sum(p.numel() for p in model.parameters()),
                                                          "diffusers": diffusers_params},
           "matmul_peak_gflops": peak / 1e9, "sampler_gflops": flops / sec["lafq"] / 1e9,
           "fraction_of_peak": flops / sec["lafq"] / peak,
           "channels_last_speedup": sec["lafq, NCHW layout"] / sec["lafq"], "compile_first_call_s": compile_s}
    out["seconds_per_repeat"] = times
    if "diffusers" in ips:
        ratios = paired_ratios(times["diffusers"], times["lafq"])
        out["ratio_vs_diffusers"] = statistics.median(ratios)
        out["ratio_vs_diffusers_repeats"] = ratios
        out["ratio_vs_diffusers_spread"] = [min(ratios), max(ratios)]
        out["ratio_of_median_times"] = ips["lafq"] / ips["diffusers"]
        out["fast_paths_speedup"] = statistics.median(paired_ratios(times["lafq, without CPU fast paths"],
                                                                    times["lafq"]))
        # The stricter baseline: per repeat, the faster of diffusers' two layouts.
        best = [min(a, b) for a, b in zip(times["diffusers"], times["diffusers, channels-last"])]
        out["ratio_vs_best_diffusers_layout"] = statistics.median(paired_ratios(best, times["lafq"]))
        cpu_ratios = paired_ratios(cpu["diffusers"], cpu["lafq"])
        out["cpu_seconds_per_repeat"] = cpu
        out["ratio_vs_diffusers_cpu_time"] = statistics.median(cpu_ratios)
        out["ratio_vs_diffusers_cpu_time_spread"] = [min(cpu_ratios), max(cpu_ratios)]
        out["profile_ms_per_step"] = {"lafq": op_breakdown(variants["lafq"], s.steps),
                                      "diffusers": op_breakdown(variants["diffusers"], s.steps)}
    return out


# -- compile ----------------------------------------------------------------------------------

_COMPILE_PROBE = """
import json, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from lafq.compile_cache import compile_model
from lafq.diffusion import ddim_sample, linear_schedule
from lafq.pipeline import load_denoiser

batch, steps = int(sys.argv[1]), int(sys.argv[2])
model, _ = load_denoiser()
schedule, labels = linear_schedule(), torch.arange(batch) % 10
job = lambda m: ddim_sample(m, schedule, batch, labels=labels, steps=steps, guidance=2.0,
                            generator=torch.Generator().manual_seed(0))
compiled = compile_model(model)
t0 = time.perf_counter()
job(compiled)
first = time.perf_counter() - t0
times = {"compiled": [], "eager": []}
for _ in range(3):
    for k, m in (("compiled", compiled), ("eager", model)):
        t0 = time.perf_counter()
        job(m)
        times[k].append(time.perf_counter() - t0)
c, e = statistics.median(times["compiled"]), statistics.median(times["eager"])
print(json.dumps({"first_call_s": first, "compiled_s": c, "eager_s": e, "overhead_s": first - c}))
"""


def bench_compile(s: BenchSettings) -> dict:
    """Two fresh processes sharing one empty compile cache: the first compiles, the second should find it.
    Overhead = first compiled call minus the median later call of the same job (DDIM-steps, batch)."""
    import tempfile

    out = {"job": f"DDIM-{s.steps}, batch {s.batch}, guidance {GUIDANCE}, torch.compile (inductor, CPU)"}
    with tempfile.TemporaryDirectory(prefix="lafq-compile-cache-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
        env.update(PYTHONPATH=str(REPO), LAFQ_CACHE_DIR=cache)
        for name in ("first process (empty cache)", "second process (cache from the first)"):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", _COMPILE_PROBE, str(s.batch), str(s.steps),
                                str(torch.get_num_threads())], capture_output=True, text=True, env=env, cwd=REPO)
            row = {"error": r.stderr.strip()[-300:]} if r.returncode else json.loads(r.stdout.strip().splitlines()[-1])
            row["process_s"] = time.perf_counter() - t0
            out[name] = row
    return out


# -- fisher -----------------------------------------------------------------------------------

def bench_fisher(model, s: BenchSettings) -> dict:
    """The whole bins x samples map per method, interleaved bin by bin (same draws for every method)."""
    from lafq.data import load_dataset
    from lafq.fisher import bin_edges
    from lafq.models import from_lafq_unet
    from lafq.persample import METHODS, sq_grads

    x_all, y_all = load_dataset("mnist-train5k").tensors()
    den = from_lafq_unet(model, linear_schedule())
    edges = bin_edges(s.fisher_bins)
    gen = torch.Generator().manual_seed(0)
    total = {k: 0.0 for k in METHODS}
    was = model.training
    model.eval()
    for b in range(s.fisher_bins):
        idx = torch.randint(len(x_all), (s.fisher_samples,), generator=gen)
        t = torch.randint(edges[b], edges[b + 1], (s.fisher_samples,), generator=gen)
        args = (x_all[idx], torch.randn(s.fisher_samples, 1, 28, 28, generator=gen), t, y_all[idx])
        for k in METHODS:
            t0 = time.perf_counter()
            sq_grads(den, *args, method=k)
            total[k] += time.perf_counter() - t0
    model.train(was)
    return {"map": f"{s.fisher_bins} bins x {s.fisher_samples} samples", "seconds": total,
            "hooks_vs_naive": total["naive"] / total["hooks"], "vmap_vs_naive": total["naive"] / total["vmap"]}


def bench_fisher_diffusers(s: BenchSettings) -> dict:
    """Fisher map throughput on a diffusers UNet2DModel (the parameter-matched one the sampling section
    uses, class-conditional with a null class): lafq.persample's layer hooks vs its naive per-sample
    loop on the same draws, and the hooks' useful FLOP/s (forward + backward ≈ 3 × forward FLOPs per
    sample) against the machine's fp32 matmul peak measured in the same run."""
    from diffusers import DDPMScheduler

    from lafq.data import load_dataset
    from lafq.fisher import bin_edges
    from lafq.persample import sq_grads
    from lafq.models import Conditioning, from_diffusers

    unet = diffusers_unet()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    den = from_diffusers(unet, sched, conditioning=Conditioning({"class_labels": torch.arange(11)}, 11), null_row=10)
    x_all, _ = load_dataset("mnist-train5k").tensors()
    edges = bin_edges(s.fisher_bins)
    gen = torch.Generator().manual_seed(0)
    total, methods = {"hooks": 0.0, "naive": 0.0}, {}
    for b in range(s.fisher_bins):
        n = s.fisher_samples
        args = (x_all[torch.randint(len(x_all), (n,), generator=gen)], torch.randn(n, 1, 28, 28, generator=gen),
                torch.randint(edges[b], edges[b + 1], (n,), generator=gen), torch.randint(11, (n,), generator=gen))
        for k in total:
            t0 = time.perf_counter()
            _, used = sq_grads(den, *args, method=k, methods=methods.get(k))
            total[k] += time.perf_counter() - t0
            methods.setdefault(k, used)
    samples = s.fisher_bins * s.fisher_samples
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        unet(torch.randn(1, 1, 28, 28), torch.tensor([500]), class_labels=torch.tensor([3]))
    useful = 3 * fc.get_total_flops() * samples
    peak = matmul_peak()
    return {"map": f"{s.fisher_bins} bins x {s.fisher_samples} samples", "model": "diffusers UNet2DModel",
            "params": sum(p.numel() for p in unet.parameters()), "seconds": total,
            "samples_per_s": {k: samples / v for k, v in total.items()}, "hooks_vs_naive": total["naive"] / total["hooks"],
            "hooks_fallback": sorted({v for v in methods["hooks"].values()}), "useful_gflops": useful / total["hooks"] / 1e9,
            "matmul_peak_gflops": peak / 1e9, "fraction_of_peak": useful / total["hooks"] / peak}


# -- fid --------------------------------------------------------------------------------------

def bench_fid(s: BenchSettings, sampling_images_per_s: float | None) -> dict:
    """Seconds from N uint8 images to an FID against cached reference statistics (sampling excluded);
    'included' adds N / (the sampler's measured images per second at the sampling section's job)."""
    from lafq.data import load_dataset
    from lafq.metrics import frechet_distance, get_backend, inception_weights_path, reference_statistics
    from lafq.metrics import statistics as stats

    images = torch.from_numpy(load_dataset("mnist-test10k").images)
    out = {}
    backends = ["classifier"] + (["inception"] if inception_weights_path() else [])
    for name in backends:
        backend = get_backend(name)
        ref = reference_statistics(backend, "mnist-train5k")
        for n in s.fid_ns:
            imgs = images[:n] if n <= len(images) else images.repeat(n // len(images) + 1, 1, 1)[:n]
            sec = interleaved({"fid": lambda: frechet_distance(stats(backend.features(imgs)), ref)}, 1)["fid"]
            row = {"excluded_s": sec}
            if sampling_images_per_s:
                row["included_s"] = sec + n / sampling_images_per_s
            out[f"{name} N={n}"] = row
    if "inception" not in backends:
        out["inception"] = "not measured: pytorch-fid's Inception weights are not on this machine"
    return out


# -- quantized inference ----------------------------------------------------------------------

def bench_plans(model, fisher) -> dict:
    """The plans the issue names: FP32, FP16-mixed (layer-ratio p=0.25), uniform INT8 / INT4, budget 4.5 bits,
    and uniform BF16 (for BF16 compute)."""
    from lafq.policy import Plan, Policy, make_plan, param_shapes
    from lafq.precision import fallback

    shapes, w = param_shapes(model), dict(model.named_parameters())
    uniform = lambda p: Plan({n: fallback(sh, p) for n, sh in shapes.items()}, {"strategy": "uniform", "target": p})
    return {"fp32": uniform("fp32"), "fp16 layer-ratio p=0.25": make_plan(Policy("layer-ratio", p=0.25), fisher, w),
            "int8 uniform": uniform("int8"), "int4 uniform": uniform("int4"),
            "budget 4.5 bits": make_plan(Policy("budget", avg_bits=4.5, statistic="mean"), fisher, w),
            "bf16 uniform": uniform("bf16")}


# Rows of the quantized section: (plan, compute). "dequantize" is the default path; "int8-dynamic" the
# opt-in torch.ao kernels (lafq.int8); "w8a8" the same int8 convolutions with static activation scales, calibrated
# per timestep bin on 16 images (DDIM-10, seed 1: not the fidelity job's noise) (lafq.int8.use_w8a8); "bf16" runs
# every op in bfloat16 (a quantized model's .to(bfloat16)).
QUANTIZED_ROWS = {"fp32": ("fp32", "dequantize"),
                  "fp16 layer-ratio p=0.25": ("fp16 layer-ratio p=0.25", "dequantize"),
                  "int8 uniform": ("int8 uniform", "dequantize"),
                  "int4 uniform": ("int4 uniform", "dequantize"),
                  "budget 4.5 bits": ("budget 4.5 bits", "dequantize"),
                  "int8 uniform, int8-dynamic kernels": ("int8 uniform", "int8-dynamic"),
                  "int4 uniform, int8-dynamic kernels": ("int4 uniform", "int8-dynamic"),
                  "budget 4.5 bits, int8-dynamic kernels": ("budget 4.5 bits", "int8-dynamic"),
                  "int8 uniform, w8a8 static per timestep bin": ("int8 uniform", "w8a8"),
                  "budget 4.5 bits, w8a8 static per timestep bin": ("budget 4.5 bits", "w8a8"),
                  "bf16 uniform, bf16 compute": ("bf16 uniform", "bf16")}


class CastInput(torch.nn.Module):
    """A denoiser computing in `dtype` behind the sampler's float32 interface."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x, t, y=None):
        return self.model(x.to(self.dtype), t, y).float()


def build_variant(model, plan, compute: str):
    """The runnable denoiser for one QUANTIZED_ROWS entry (a copy; `model` is left as it is)."""
    import copy

    from lafq.quantize import quantize

    if compute == "bf16":
        return CastInput(quantize(copy.deepcopy(model), plan).to(torch.bfloat16), torch.bfloat16)
    if all(p == "fp32" for p in plan.precisions.values()):
        return model
    if compute == "w8a8":
        from lafq.int8 import calibrate_activations, use_w8a8
        from lafq.pipeline import as_denoiser

        q = quantize(copy.deepcopy(model), plan)
        return use_w8a8(q, calibrate_activations(as_denoiser(q), n=16, steps=10, bins=5, seed=1, guidance=GUIDANCE))
    return quantize(copy.deepcopy(model), plan, compute=compute)


_MEMORY_PROBE = """
import json, sys, torch
from pathlib import Path
from bench.harness import build_variant
from lafq.diffusion import guided_eps
from lafq.pipeline import load_denoiser
from lafq.policy import Plan

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024

plan = Plan(**json.loads(sys.stdin.read()))
b, compute = int(sys.argv[1]), sys.argv[2]
x, t, y = torch.randn(b, 1, 28, 28), torch.full((b,), 500), torch.arange(b) % 10
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) after imports
before = status("VmRSS")
m, _ = load_denoiser()
m = build_variant(m, plan, compute)
resident = sum(v.nbytes for v in list(m.parameters()) + list(m.buffers()))
for mod in m.modules():  # torch.ao's packed int8 weights are neither parameters nor buffers
    if hasattr(mod, "_weight_bias"):
        w, bias = mod._weight_bias()
        resident += w.numel() * w.element_size() + w.q_per_channel_scales().nbytes + (0 if bias is None else bias.nbytes)
    if hasattr(mod, "int8_bytes"):  # lafq's oneDNN int8 convolutions hold an opaque packed weight
        resident += mod.int8_bytes + mod.w_scale.nbytes + (0 if mod.bias is None else mod.bias.nbytes)
with torch.inference_mode():
    guided_eps(m, x, t, y, 2.0, 10)
print(json.dumps({"peak_rss_increase": status("VmHWM") - before, "model_tensor_bytes": resident}))
"""


def _memory_child(plan_json: str, batch: int, compute: str = "dequantize") -> dict:
    """In a fresh process: bytes the model's tensors hold, and how far the peak RSS rose from loading
    the checkpoint to the end of one guided step (Linux: the peak is reset through /proc/self/clear_refs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(batch), compute], input=plan_json, capture_output=True,
                       text=True, env=env, cwd=REPO)
    if r.returncode:
        return {"error": r.stderr.strip()[-300:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_quantized(model, fisher, s: BenchSettings) -> dict:
    import copy

    from lafq.classifier import load_classifier
    from lafq.diffusion import guided_eps
    from lafq.metrics import DEFAULT_CLASSIFIER, fidelity
    from lafq.pipeline import SampleSpec, generate
    from lafq.quantize import hold_dequantized, size_report

    plans = bench_plans(model, fisher)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    models = {k: build_variant(model, plans[pk], c) for k, (pk, c) in QUANTIZED_ROWS.items()}
    b = s.batch
    x, t, y = torch.randn(b, 1, 28, 28), torch.full((b,), 500), torch.arange(b) % 10
    step = lambda m: (lambda: torch.inference_mode()(guided_eps)(m, x, t, y, GUIDANCE, 10))

    def held_step(m):  # as in sampling: weights dequantized once per call (hold_dequantized), then reused
        def run():
            with hold_dequantized(m):
                for _ in range(4):
                    step(m)()
        return run
    variants = {f"{k} | held": held_step(m) for k, m in models.items()}
    variants.update({f"{k} | every forward": step(m) for k, m in models.items() if QUANTIZED_ROWS[k][1] == "dequantize"})
    times = interleaved_times(variants, s.latency_reps)
    sec = {k: statistics.median(v) for k, v in times.items()}
    clf = load_classifier(DEFAULT_CLASSIFIER)[0]
    spec = SampleSpec(n=s.fidelity_n, steps=s.fidelity_steps, seed=0)
    ref = generate(model, spec)[0]
    out = {"job": f"guided denoising steps, batch {b} (2x{b} forward), CPU", "plans": {},
           "fidelity_job": f"{spec.n} images, DDIM-{spec.steps}, guidance {spec.guidance}, seed 0, vs FP32's"}
    for k, (pk, compute) in QUANTIZED_ROWS.items():
        plan = plans[pk]
        held = sec[f"{k} | held"] / 4
        every = sec.get(f"{k} | every forward")
        m = models[k]  # generate casts the sampler's state to a quantized model's compute dtype itself
        f = fidelity(ref, generate(m.model if isinstance(m, CastInput) else m, spec)[0], clf)
        vs_fp32 = paired_ratios(times[f"{k} | held"], times["fp32 | held"])  # time / FP32's, per repeat
        out["plans"][k] = {"compute": compute, "ms_per_image_step": 1000 * held / b,
                           "slowdown_vs_fp32": statistics.median(vs_fp32),
                           "slowdown_vs_fp32_repeats": vs_fp32,
                           "ms_per_image_step_dequantizing_every_forward": None if every is None else 1000 * every / b,
                           "weight_bytes": size_report(plan, shapes).total_bytes,
                           "fidelity": f.to_dict(),
                           **_memory_child(json.dumps({"precisions": plan.precisions}), b, compute)}
    if torch.cuda.is_available():
        gpu = {}
        xs = [v.cuda() for v in (x, t, y)]
        for k, (pk, compute) in QUANTIZED_ROWS.items():
            m = models[k]
            if compute != "dequantize":
                continue
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                g = copy.deepcopy(m).cuda().to(dtype)  # a quantized model keeps its stored forms
                fn = lambda g=g, dtype=dtype: (torch.inference_mode()(guided_eps)(g, xs[0].to(dtype), xs[1], xs[2], GUIDANCE, 10),
                                               torch.cuda.synchronize())
                gpu[f"{k}, {str(dtype)[6:]} compute"] = 1000 * interleaved({"g": fn}, s.latency_reps)["g"] / b
        out["gpu_ms_per_image_step"] = gpu
    return out


# -- app --------------------------------------------------------------------------------------

def bench_app(runs: int = 3) -> dict:
    script = REPO / "bench" / "app_bench.py"
    if not script.exists():
        return {"skipped": f"{script} not found (the app benchmarks live with the app)"}
    r = subprocess.run([sys.executable, str(script), "--json", "--runs", str(runs)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    if r.returncode:
        return {"failed": r.stderr.strip()[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- all --------------------------------------------------------------------------------------

def run(s: BenchSettings, sections=SECTIONS, log=print) -> dict:
    from lafq.fisher import FisherMap
    from lafq.pipeline import load_denoiser

    model, _ = load_denoiser()
    res = {"machine": machine(), "settings": s.__dict__, "sections": {}}
    log(f"machine: {res['machine']}")
    ips = None
    for name in sections:
        t0 = time.perf_counter()
        if name == "sampling":
            r = bench_sampling(model, s)
            ips = r["images_per_s"]["lafq"]
            if "ratio_vs_diffusers" in r:
                lo, hi = r["ratio_vs_diffusers_spread"]
                log(f"sampling: lafq / diffusers = {r['ratio_vs_diffusers']:.2f}x, median of {len(r['ratio_vs_diffusers_repeats'])} "
                    f"interleaved repeats (spread {lo:.2f}..{hi:.2f}); by CPU time {r['ratio_vs_diffusers_cpu_time']:.2f}x")
        elif name == "compile":
            r = bench_compile(s)
        elif name == "fisher":
            r = bench_fisher(model, s)
        elif name == "fisher-diffusers":
            r = bench_fisher_diffusers(s)
        elif name == "fid":
            r = bench_fid(s, ips)
        elif name == "quantized":
            r = bench_quantized(model, FisherMap.load(paths.FISHER), s)
        elif name == "app":
            r = bench_app(s.app_runs)
        else:
            raise ValueError(f"unknown bench section {name!r}; choose from {SECTIONS}")
        r["section_seconds"] = time.perf_counter() - t0
        res["sections"][name] = r
        log(f"[{name}] " + json.dumps(r, default=float)[:2000])
    return res


def _f(v, spec=".2f"):
    if v is None:
        return "n/a"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _spread(v: dict) -> str:
    reps = v.get("slowdown_vs_fp32_repeats")
    return f" ({min(reps):.2f}–{max(reps):.2f})" if reps and len(reps) > 1 else ""


def markdown(res: dict, command: str) -> str:
    """The tables docs/benchmarks.md quotes."""
    m = res["machine"]
    L = [f"Command: `{command}`. Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, "
         f"torch {m['torch']}, Python {m['python']}, GPU: {m['gpu'] or 'none'}.", ""]
    sec = res["sections"]
    if "sampling" in sec:
        r = sec["sampling"]
        L += [f"### Sampling: {r['job']}", "", "| sampler | params | images/s | ratio vs diffusers | seconds per repeat |",
              "|---|---:|---:|---:|---|"]
        base = r["images_per_s"].get("diffusers")
        for k, v in r["images_per_s"].items():
            p = r["params"]["diffusers" if k.startswith("diffusers") else "lafq"]
            reps = ", ".join(f"{x:.2f}" for x in r.get("seconds_per_repeat", {}).get(k, []))
            L.append(f"| {k} | {p:,} | {v:.1f} | {_f(v / base) if base else 'n/a'} | {reps} |")
        if "ratio_vs_diffusers_repeats" in r:
            lo, hi = r["ratio_vs_diffusers_spread"]
            L += ["", f"lafq / diffusers, per interleaved repeat: **{r['ratio_vs_diffusers']:.2f}x** median of "
                      f"{len(r['ratio_vs_diffusers_repeats'])} (spread {lo:.2f}..{hi:.2f}: "
                      + ", ".join(f"{x:.2f}" for x in r["ratio_vs_diffusers_repeats"]) + ")."]
            if "ratio_vs_best_diffusers_layout" in r:
                L += ["", f"Against the faster of diffusers' two layouts in each repeat: "
                          f"{r['ratio_vs_best_diffusers_layout']:.2f}x median. lafq's CPU fast paths "
                          f"(`lafq.model.FAST_INFERENCE`): {r['fast_paths_speedup']:.2f}x."]
        if "ratio_vs_diffusers_cpu_time" in r:
            lo, hi = r["ratio_vs_diffusers_cpu_time_spread"]
            L += ["", f"By process CPU time (less sensitive to other jobs taking turns on the cores): "
                      f"{r['ratio_vs_diffusers_cpu_time']:.2f}x median (spread {lo:.2f}..{hi:.2f})."]
        if "profile_ms_per_step" in r:
            pl, pd = r["profile_ms_per_step"]["lafq"], r["profile_ms_per_step"]["diffusers"]
            L += ["", "Profile (torch.profiler, self CPU time of one job, ms per denoising step):", "",
                  "| op kind | lafq | diffusers |", "|---|---:|---:|"]
            L += [f"| {k} | {pl[k]:.1f} | {pd.get(k, 0):.1f} |" for k in pl]
            L += [f"| total | {sum(pl.values()):.1f} | {sum(pd.values()):.1f} |"]
        L += ["", f"Achieved {r['sampler_gflops']:.1f} GFLOP/s = **{100 * r['fraction_of_peak']:.0f}%** of a "
                  f"{r['matmul_peak_gflops']:.1f} GFLOP/s fp32 matmul peak measured in the same run "
                  f"(FLOPs by torch.utils.flop_counter). Channels-last weights: {r['channels_last_speedup']:.2f}x."
              + (f" torch.compile's first call (compilation + one job): {r['compile_first_call_s']:.0f} s."
                 if r.get("compile_first_call_s") else ""), ""]
    if "compile" in sec:
        r = sec["compile"]
        L += [f"### torch.compile across processes: {r['job']}", "", "| process | first call (s) | compiled job (s) | "
              "overhead (s) | eager job (s) | process wall (s) |", "|---|---:|---:|---:|---:|---:|"]
        for k, v in r.items():
            if isinstance(v, dict):
                L.append(f"| {k} | {_f(v.get('first_call_s'), '.1f')} | {_f(v.get('compiled_s'))} | "
                         f"{_f(v.get('overhead_s'), '.1f')} | {_f(v.get('eager_s'))} | {_f(v.get('process_s'), '.1f')} |")
        L.append("")
    if "fisher" in sec:
        r = sec["fisher"]
        L += [f"### Fisher map ({r['map']})", "", "| method | seconds | speed-up vs naive |", "|---|---:|---:|"]
        for k, v in r["seconds"].items():
            L.append(f"| {k} | {v:.1f} | {r['seconds']['naive'] / v:.2f}x |")
        L.append("")
    if "fisher-diffusers" in sec:
        r = sec["fisher-diffusers"]
        L += [f"### Fisher map of a {r['model']} ({r['params']:,} parameters, {r['map']})", "",
              "| method | seconds | samples/s | speed-up vs naive |", "|---|---:|---:|---:|"]
        for k, v in r["seconds"].items():
            L.append(f"| {k} | {v:.1f} | {r['samples_per_s'][k]:.1f} | {r['seconds']['naive'] / v:.2f}x |")
        L += ["", f"Hooks (with per-parameter fallbacks: {', '.join(r['hooks_fallback'])}): {r['useful_gflops']:.1f} "
                  f"useful GFLOP/s (forward + backward = 3 × forward FLOPs per sample) = **{100 * r['fraction_of_peak']:.0f}%** "
                  f"of a {r['matmul_peak_gflops']:.1f} GFLOP/s fp32 matmul peak measured in the same run.", ""]
    if "fid" in sec:
        job = sec.get("sampling", {}).get("job", "the sampling section's job")
        L += ["### FID (features + statistics + Fréchet distance)", "", "Sampling included = excluded + N / the "
              f"measured images/s of {job}.", "", "| backend, N | sampling excluded (s) | sampling included (s) |",
              "|---|---:|---:|"]
        for k, v in sec["fid"].items():
            if isinstance(v, dict):
                L.append(f"| {k} | {v['excluded_s']:.1f} | {_f(v.get('included_s'), '.0f')} |")
            elif k != "section_seconds":
                L.append(f"| {k} | {v} | |")
        L.append("")
    if "quantized" in sec:
        r = sec["quantized"]
        L += [f"### Quantized inference: {r['job']}", "", "ms/image/step: weights dequantized once per sampling call, as "
              "`generate` does; 'every forward' dequantizes before each forward (a lone step). Fidelity to FP32 "
              f"(lafq.metrics.fidelity): {r.get('fidelity_job', '')}.", "",
              "| plan | compute | size (bytes) | model tensors in memory (bytes) | ms/image/step | time vs FP32, paired (spread) | every "
              "forward | peak RSS rise, load + 1 step (MiB) | mean abs diff /255 | PSNR (dB) | feature dist. | class agreement |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, v in r["plans"].items():
            fd = v.get("fidelity", {})
            L.append(f"| {k} | {v.get('compute', 'dequantize')} | {v['weight_bytes']:,} | {_f(v.get('model_tensor_bytes'), ',')} | "
                     f"{v['ms_per_image_step']:.2f} | {v['slowdown_vs_fp32']:.2f}x{_spread(v)} | "
                     f"{_f(v.get('ms_per_image_step_dequantizing_every_forward'))} | "
                     f"{_f(v.get('peak_rss_increase', 0) / 2 ** 20, '.1f')} | {_f(fd.get('mad'), '.4f')} | "
                     f"{_f(fd.get('psnr'), '.1f')} | {_f(fd.get('feature_distance'), '.3f')} | {_f(fd.get('agreement'), '.3f')} |")
        for k, v in r.get("gpu_ms_per_image_step", {}).items():
            L.append(f"| GPU: {k} | | {v:.3f} | | |")
        L.append("")
    if "app" in sec:
        r = sec["app"]
        L += ["### App", ""] + [f"- {k}: {_f(v)}" for k, v in r.items() if k != "section_seconds"] + [""]
    return "\n".join(L)
