"""What every tab shares: the FP32 model, its Fisher map, caches, and input validation.

Nothing here imports gradio: handlers raise `InputError` (a ValueError) and the UI layer turns
it into a gr.Error, so the same code is unit-tested without a server.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lafq.checkpoint import CheckpointError
from lafq.diffusion import linear_schedule
from lafq.fisher import FisherMap, compute_fisher, state_digest
from lafq.pipeline import load_denoiser
from lafq.policy import Plan, Policy, make_plan, param_shapes
from lafq.quantize import quantize_, size_report, to_device

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "checkpoints" / "unet.safetensors"
FISHER = REPO / "checkpoints" / "fisher.safetensors"
REPORT_CSV = REPO / "docs" / "report.csv"

# Caps that keep one request from holding a 2-core host for long.
MAX_FID_N = 2000
MAX_FID_SEEDS = 5
MAX_STEPS = 200
MAX_SAMPLES = 64
MAX_BINS = 100
MAX_FISHER_SAMPLES = 256


class Cancelled(Exception):
    """A long job stopped because its user pressed Cancel."""


class Jobs:
    """One cancel flag per browser session. Gradio's `cancels=` stops the page from waiting but cannot
    stop a worker thread; the running job's progress callback checks this flag and stops it."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._flags[session] = flag
        return flag

    def cancel(self, session: str) -> None:
        with self._lock:
            flag = self._flags.get(session)
        if flag is not None:
            flag.set()

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(session) is flag:
                del self._flags[session]


def cancellable(progress, cancel: threading.Event | None):
    """Wrap a progress callback so that it raises Cancelled once `cancel` is set."""
    if cancel is None:
        return progress

    def check(*args, **kwargs):
        if cancel.is_set():
            raise Cancelled("cancelled")
        if progress is not None:
            progress(*args, **kwargs)
    return check


class InputError(ValueError):
    """A request value out of range or of the wrong kind; the message says what is accepted."""


def as_number(value, name: str, lo: float, hi: float, integer: bool = False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in [{lo}, {hi}], got {value!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise InputError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    if integer:
        if v != int(v):
            raise InputError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
        return int(v)
    return v


def as_choice(value, name: str, choices):
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def digit_or_none(value) -> int | None:
    """'any' / None -> unconditional; '0'..'9' -> that digit."""
    if value in (None, "", "any", "unconditional"):
        return None
    return as_number(value, "digit", 0, 9, integer=True)


@dataclass
class FIDPoint:
    label: str
    bytes: int
    pct_of_fp32: float
    fid_mean: float
    fid_ci95: float
    backend: str
    n: int
    accuracy: float | None = None


@dataclass
class AppState:
    model: torch.nn.Module
    fisher: FisherMap
    fisher_note: str  # where the map came from (shipped, recomputed, stale...)
    device: str = "cpu"
    schedule: object = field(default_factory=linear_schedule)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _quantized: OrderedDict = field(default_factory=OrderedDict)
    fid_cache: dict = field(default_factory=dict)
    jobs: Jobs = field(default_factory=Jobs)
    pareto: list[FIDPoint] = field(default_factory=list)
    _classifier: object = None
    _backend: object = None

    @property
    def shapes(self) -> dict:
        return param_shapes(self.model)

    @property
    def weights(self) -> dict:  # on the CPU, beside the Fisher map they are scored with
        return {n: p.detach().cpu() for n, p in self.model.named_parameters()}

    def plan(self, policy: Policy) -> Plan:
        return make_plan(policy, self.fisher, self.weights)

    def size(self, plan: Plan):
        return size_report(plan, self.shapes)

    def quantized(self, plan: Plan) -> torch.nn.Module:
        """The quantized model for a plan, built once and kept (a few, least recently used first out)."""
        key = plan_key(plan)
        with self.lock:
            if key in self._quantized:
                self._quantized.move_to_end(key)
                return self._quantized[key]
        q = to_device(quantize_(copy.deepcopy(self.model).cpu(), plan), self.device)  # quantized on the CPU, then moved
        with self.lock:
            self._quantized[key] = q
            while len(self._quantized) > 6:
                self._quantized.popitem(last=False)
        return q

    def classifier(self):
        if self._classifier is None:
            from lafq.classifier import load_classifier
            from lafq.metrics import DEFAULT_CLASSIFIER
            self._classifier = load_classifier(DEFAULT_CLASSIFIER)[0]
        return self._classifier

    def backend(self):
        if self._backend is None:
            from lafq.metrics import get_backend
            self._backend = get_backend("auto")
        return self._backend


def plan_key(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(plan.precisions, sort_keys=True).encode()).hexdigest()[:16]


def load_state(checkpoint=CHECKPOINT, fisher_path=FISHER, quick_bins: int = 5, quick_samples: int = 4,
               device: str = "auto") -> AppState:
    """Load the model (onto `device`: "auto" takes the GPU where there is one) and its Fisher map; if the
    shipped map is missing or belongs to other weights, compute a small one (a few seconds) and say so."""
    from lafq.device import resolve_device

    dev = resolve_device(device)
    model, _ = load_denoiser(checkpoint)
    if getattr(model, "lafq_plan", None) is not None:
        raise CheckpointError(f"{checkpoint} is a quantized model; the app needs the FP32 checkpoint")
    digest = state_digest(model)
    fm, note = None, ""
    if Path(fisher_path).is_file():
        fm = FisherMap.load(fisher_path)
        if fm.meta.get("checkpoint_digest") != digest:
            note = (f"the shipped Fisher map was computed on other weights; using a rough {quick_bins}-bin x {quick_samples}-sample "
                    "map until you recompute (Fisher tab)")
            fm = None
        else:
            note = (f"shipped map: {fm.bins} bins x {fm.meta.get('samples_per_bin')} samples, groups: "
                    f"{'all + per digit' if len(fm.groups) > 1 else 'all'}")
    else:
        note = f"no shipped Fisher map; using a rough {quick_bins}-bin x {quick_samples}-sample map until you recompute (Fisher tab)"
    if fm is None:
        from lafq.data import load_dataset
        x, y = load_dataset("mnist-test10k").tensors()
        fm = compute_fisher(model, x, y, bins=quick_bins, samples_per_bin=quick_samples, method="naive")  # tiny: no vmap set-up cost
    return AppState(model=model.to(dev), fisher=fm, fisher_note=note, device=str(dev))
