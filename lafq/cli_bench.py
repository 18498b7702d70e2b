"""`python -m lafq bench`: the command; the harness (bench/harness.py, what each section measures)
lives in the repository beside the library, so an installed lafq without a checkout says so in one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _harness():
    from . import paths

    path = paths.REPO / "bench" / "harness.py"
    if not path.is_file():
        raise ValueError("the benchmark harness is in the repository's bench/ folder: run `python -m lafq bench` "
                         "from a checkout of the repository")
    if str(paths.REPO) not in sys.path:
        sys.path.insert(0, str(paths.REPO))  # the checkout this lafq was imported from
    from bench import harness

    if Path(harness.__file__).resolve() != path.resolve():
        raise ValueError(f"another package named bench ({harness.__file__}) shadows {path}; run from the checkout")
    return harness.QUICK_SECTIONS, harness.SECTIONS, harness.BenchSettings, harness.markdown, harness.run


def cmd_bench(args):
    import torch

    from .checkpoint import atomic_write_bytes

    QUICK_SECTIONS, SECTIONS, BenchSettings, markdown, run = _harness()

    if args.threads:
        torch.set_num_threads(args.threads)
    sections = tuple(args.only.split(",")) if args.only else (QUICK_SECTIONS if args.quick else SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench section(s) {unknown}; choose from {list(SECTIONS)}")
    s = BenchSettings.quick() if args.quick else BenchSettings()
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    res = run(s, sections, log=log)
    command = "python -m lafq bench" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    md = markdown(res, command)
    if args.md:
        atomic_write_bytes(args.md, md.encode())
    if args.json:
        print(json.dumps(res, default=float, sort_keys=True), flush=True)
    else:
        print("\n" + md)


def register_bench(sub):
    b = sub.add_parser("bench", help="speed: sampling vs diffusers, Fisher methods, FID, quantized latency, app")
    b.add_argument("--quick", action="store_true", help="short jobs (a few minutes on 2 cores); ratios stay meaningful")
    b.add_argument("--only", default=None, help="comma-separated sections: sampling,compile,fisher,fisher-diffusers,fid,quantized,app "
                   "(--quick runs all but compile)")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    b.add_argument("--md", type=Path, default=None, help="also write the markdown tables to this file")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)


REGISTER = [register_bench]
