"""The bench's own logic (its numbers belong in docs/benchmarks.md, not in tests)."""
from pathlib import Path

from bench.harness import BenchSettings, interleaved, markdown


def test_variants_run_interleaved_after_a_warm_up_each():
    order = []
    sec = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, reps=2)
    assert order == ["a", "b", "a", "b", "a", "b"] and set(sec) == {"a", "b"}


def test_quick_settings_are_smaller_everywhere():
    q, full = BenchSettings.quick(), BenchSettings()
    assert q.steps < full.steps and q.fisher_bins * q.fisher_samples < full.fisher_bins * full.fisher_samples
    assert not q.compile and max(q.fid_ns) <= max(full.fid_ns)


def test_markdown_names_machine_command_and_ratios():
    res = {"machine": {"cpu": "X", "cores": 2, "threads": 2, "torch": "t", "python": "3.11", "gpu": None},
           "sections": {
               "sampling": {"job": "DDIM-5", "images_per_s": {"lafq": 30.0, "diffusers": 20.0},
                            "params": {"lafq": 10, "diffusers": 11}, "sampler_gflops": 50.0, "fraction_of_peak": 0.5,
                            "matmul_peak_gflops": 100.0, "channels_last_speedup": 1.4, "compile_first_call_s": None},
               "fisher": {"map": "3 bins x 16 samples", "seconds": {"hooks": 1.0, "vmap": 2.0, "naive": 3.0}},
               "fid": {"classifier N=1000": {"excluded_s": 1.0, "included_s": 30.0}, "inception": "not measured"},
               "app": {"cold_start_median_s": 7.5}}}
    md = markdown(res, "python -m lafq bench --quick")
    assert "`python -m lafq bench --quick`" in md and "GPU: none" in md
    assert "| lafq | 10 | 30.0 | 1.50 |" in md and "| naive | 3.0 | 1.00x |" in md and "| hooks | 1.0 | 3.00x |" in md
    assert "50%" in md and "cold_start_median_s: 7.50" in md


def test_ratios_pair_each_repeat_so_a_load_spike_hits_both_sides():
    from bench.harness import paired_ratios

    assert paired_ratios([3.0, 6.0, 3.3], [2.0, 4.0, 2.0]) == [1.5, 1.5, 1.65]


def test_quick_runs_skip_the_compile_section_which_needs_an_empty_cache():
    from bench.harness import QUICK_SECTIONS, SECTIONS

    assert "compile" in SECTIONS and "compile" not in QUICK_SECTIONS
    assert set(QUICK_SECTIONS) == set(SECTIONS) - {"compile"}


def test_op_breakdown_sorts_profiled_ops_into_kinds_per_step():
    import torch

    from bench.harness import op_breakdown

    x = torch.randn(2, 4, 8, 8)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    gn = torch.nn.GroupNorm(2, 4)

    def job():
        with torch.inference_mode():
            for _ in range(2):
                torch.nn.functional.silu(gn(conv(x)))
    ms = op_breakdown(job, steps=2)
    assert ms["convolution"] > 0 and ms["group norm"] > 0 and ms["silu"] > 0
    assert ms["concatenation"] == 0 and all(v >= 0 for v in ms.values())


def test_markdown_prints_the_ratio_spread_the_profile_and_the_compile_rows():
    res = {"machine": {"cpu": "X", "cores": 2, "threads": 2, "torch": "t", "python": "3.11", "gpu": None},
           "sections": {
               "sampling": {"job": "DDIM-5", "images_per_s": {"lafq": 30.0, "diffusers": 20.0},
                            "seconds_per_repeat": {"lafq": [2.0, 2.2], "diffusers": [3.0, 3.1]},
                            "ratio_vs_diffusers": 1.48, "ratio_vs_diffusers_repeats": [1.5, 1.41],
                            "ratio_vs_diffusers_spread": [1.41, 1.5],
                            "profile_ms_per_step": {"lafq": {"convolution": 10.0, "silu": 1.0},
                                                    "diffusers": {"convolution": 20.0, "silu": 2.0}},
                            "params": {"lafq": 10, "diffusers": 11}, "sampler_gflops": 50.0, "fraction_of_peak": 0.5,
                            "matmul_peak_gflops": 100.0, "channels_last_speedup": 1.4, "compile_first_call_s": None},
               "compile": {"job": "DDIM-5", "first process (empty cache)": {"first_call_s": 60.0, "compiled_s": 1.0,
                                                                            "overhead_s": 59.0, "eager_s": 1.5,
                                                                            "process_s": 70.0},
                           "second process (cache from the first)": {"first_call_s": 4.0, "compiled_s": 1.0,
                                                                     "overhead_s": 3.0, "eager_s": 1.5, "process_s": 12.0}}}}
    md = markdown(res, "python -m lafq bench")
    assert "**1.48x** median of 2 (spread 1.41..1.50: 1.50, 1.41)" in md
    assert "| convolution | 10.0 | 20.0 |" in md and "| total | 11.0 | 22.0 |" in md
    assert "| second process (cache from the first) | 4.0 | 1.00 | 3.0 | 1.50 | 12.0 |" in md


def test_the_diffusers_fisher_row_times_hooks_and_the_naive_loop_on_the_same_draws_and_reports_peak_share():
    import pytest
    from bench.harness import BenchSettings, bench_fisher_diffusers, machine, markdown

    r = bench_fisher_diffusers(BenchSettings(fisher_bins=1, fisher_samples=2))
    assert set(r["seconds"]) == {"hooks", "naive"} and r["params"] == 818_745
    assert r["useful_gflops"] > 0 and r["fraction_of_peak"] == pytest.approx(r["useful_gflops"] / r["matmul_peak_gflops"])
    md = markdown({"machine": machine(), "sections": {"fisher-diffusers": r}}, "python -m lafq bench")
    assert "### Fisher map of a diffusers UNet2DModel (818,745 parameters, 1 bins x 2 samples)" in md
    assert "of a" in md and "GFLOP/s fp32 matmul peak measured in the same run" in md


def test_the_benchmarks_page_names_the_command_that_generated_it_and_where_dated_runs_are():
    from datetime import datetime, timezone

    from lafq.cli_bench import page

    md = page("### Sampling\n\n| a |\n", "python -m lafq bench --quick --md docs/benchmarks.md",
              datetime(2026, 12, 5, 6, 0, tzinfo=timezone.utc))
    assert md.startswith("# Benchmarks\n") and "`python -m lafq bench --quick --md docs/benchmarks.md` on 2026-12-05 06:00 UTC" in md
    assert "`benchmark-runs.md`" in md and md.endswith("| a |\n")


def test_the_app_benchmark_times_the_compare_tabs_own_default_job():
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import app_bench

    r = app_bench.compare_default(runs=1)
    assert r["compare_first_s"] > 0 and r["compare_median_s"] > 0
    assert r["compare_job"].endswith("4 images, DDIM-20, FP32 + plan + uniform")
