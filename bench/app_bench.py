"""App speed: cold start of `python app.py` and the Compare tab's default job, in seconds.

    python bench/app_bench.py [--runs 3] [--json]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def compare_default(runs: int) -> dict:
    """The Generate button with the tab's defaults; the first call builds the quantized models."""
    from demo.state import load_state
    from demo.tab_compare import DEFAULTS, compare, default_class
    from demo.tab_quantize import preset_current

    state = load_state()
    cls = default_class(state)  # the model's own default class and guidance, as the tab opens
    args = [cls, state.default_guidance, DEFAULTS["steps"], DEFAULTS["seed"], DEFAULTS["n"], True]
    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        compare(state, preset_current(state), *args)  # the app's default plan
        times.append(time.perf_counter() - t0)
    return {"compare_first_s": times[0], "compare_median_s": statistics.median(times[1:]),
            "compare_job": f"{state.class_word} {cls}, {DEFAULTS['n']} images, DDIM-{DEFAULTS['steps']}, "
                           "FP32 + plan + uniform"}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from cold_start import once

    starts = [once() for _ in range(a.runs)]
    res = {"cold_start_median_s": statistics.median(starts), "cold_start_runs_s": [round(s, 2) for s in starts],
           **compare_default(a.runs)}
    print(json.dumps(res) if a.json else "\n".join(f"{k}: {v}" for k, v in res.items()))
