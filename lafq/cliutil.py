"""What every CLI command shares: one-line errors, argument types that refuse NaN and out-of-range
numbers, the --device option, and the --json / human output. Command modules import this, never lafq.cli,
so lafq.cli can import them without a cycle."""
from __future__ import annotations

import argparse
import json
import math
import sys


MAX_GUIDANCE = 50.0  # far beyond any useful scale (1.5 is the default); larger values only overflow


class CLIError(ValueError):
    """A bad argument value, reported as one line."""


def log_to(args):
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    return lambda msg: print(msg, file=stream, flush=True)


def emit(args, result: dict, human: str) -> None:
    if args.json:
        print(json.dumps(result, sort_keys=True), flush=True)
    else:
        print(human, flush=True)


def positive(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {v}")
        return v
    return parse


def number(name: str, lo: float = -math.inf, hi: float = math.inf, integer: bool = False):
    """argparse type: a finite number in [lo, hi] (NaN, inf and out-of-range values exit 2 with the range)."""
    def parse(text):
        try:
            v = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if integer else 'a number'}, "
                                             f"got {text[:40]!r}") from None
        if not math.isfinite(v) or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be in [{lo:g}, {hi:g}], got {text[:40]!r}")
        return v
    return parse


def chunk_arg(p):
    """--chunk: samples per batched backward pass of a Fisher map (memory grows with it; the map does not change
    beyond float32 rounding)."""
    p.add_argument("--chunk", type=number("--chunk", 1, 4096, integer=True), default=64,
                   help="samples per backward pass, 1..4096 (lower it when per-sample gradients run out of memory)")


def fisher_size_args(p, bins: int, samples: int) -> None:
    """--bins and --samples of a Fisher map, the same ranges for every command (defaults per command)."""
    p.add_argument("--bins", type=number("--bins", 1, 1000, integer=True), default=bins,
                   help="timestep bins over [0, T), 1..1000")
    p.add_argument("--samples", type=number("--samples", 1, 100_000, integer=True), default=samples,
                   help="samples per timestep bin, 1..100000")


def device_arg(p):
    p.add_argument("--device", default="auto", help="auto (the GPU where there is one), cpu, cuda or cuda:N")
