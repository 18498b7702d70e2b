"""The bench's own logic (its numbers belong in docs/benchmarks.md, not in tests)."""
from lafq.bench import BenchSettings, interleaved, markdown


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
