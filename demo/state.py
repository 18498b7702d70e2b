"""What every tab shares, what each user owns, and input validation.

Contracts:
- An `AppState` is shared by every user and is read-only after `load_state`: the FP32 model is never
  hooked, moved or replaced (work that needs hooks runs on a private deep copy), and the shipped
  Fisher map is never replaced. Caches in it hold only results that depend on nothing but their key.
- `UserSession` is one browser tab's or API client's own state (a gr.State): the model they selected
  (`model`, an id of demo.models' registry), the Fisher map they recomputed, their evaluations.
  Handlers return a new one; another user's never changes.
- One `AppState` class serves every model: the project's U-Net and any diffusers model are each an adapter
  (lafq.models.Denoiser) with a card (lafq.json); the tabs ask the state (`classes`, `guided`, `layers`,
  `images`, `plan`, `reference`...), never which family the model is. `load_state` loads any
  model through lafq.load.
- Long jobs run inside `AppState.job`: a cancel flag per session, the request's liveness (a client
  that cancels or disconnects stops the worker at its next step), one heavy job computing at a time
  even while a cancelled one winds down, and memory handed back to the OS afterwards.

Nothing here imports gradio: handlers raise `InputError` (a ValueError) and the UI layer turns
it into a gr.Error, so the same code is unit-tested without a server.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import hashlib
import json
import logging
import os
import re
import math
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from lafq import paths
from lafq.card import ModelCard
from lafq.checkpoint import CheckpointError
from lafq.fisher import FisherMap, state_digest
from lafq.policy import Plan, Policy, make_plan, param_shapes
from lafq.quantize import quantize, size_report

log = logging.getLogger("lafq.app")

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = paths.UNET
REPORT_CSV = paths.DOCS / "report.csv"
SENSITIVITY_CSV = paths.DOCS / "sensitivity.csv"

# Caps that keep one request from holding a 2-core host for long.
MAX_FID_N = 2000
MAX_FID_SEEDS = 5
MAX_STEPS = 200
MAX_SAMPLES = 64
MAX_BINS = 100
MAX_FISHER_SAMPLES = 256
MAX_EVALUATIONS = 50  # per user: the chart stays readable and a session's state stays small
MAX_QUANTIZED = 6  # quantized models kept (a few MB each)
MAX_FID_RESULTS = 128
ECHO = 40  # characters of a rejected value echoed back: a 10 MB string must not come back in the reply or the log


class Cancelled(Exception):
    """A long job stopped because its user pressed Cancel, cancelled from a client, or went away."""


class InputError(ValueError):
    """A request value out of range or of the wrong kind; the message says what is accepted."""


def public_text(msg: str) -> str:
    """A message as a visitor may read it: the server's own folders (the app's checkout, the temporary and home
    folders) cut from every path that starts with them, so it says `data/fashion/...`, never where the server
    keeps it."""
    import tempfile

    from lafq import paths

    for root, shown_as in ((str(paths.REPO), ""), (tempfile.gettempdir(), "…"), (os.path.expanduser("~"), "~")):
        root = root.rstrip("/")
        if root:
            pattern = r"(?<![\w.~-])" + re.escape(root) + r"(/|(?![\w.-]))"
            msg = re.sub(pattern, lambda m: (shown_as + "/" if shown_as else "") if m.group(1) else (shown_as or "."), msg)
    return msg


def shown(value) -> str:
    """A rejected value as the error message quotes it: repr, cut to ECHO characters, server folders cut."""
    r = public_text(repr(value))
    return r if len(r) <= ECHO else f"{r[:ECHO]}… ({len(r):,} characters)"


def as_number(value, name: str, lo: float, hi: float, integer: bool = False):
    if isinstance(value, bool):  # True is 1 to float(); a checkbox value where a number belongs is a mistake
        raise InputError(f"{name} must be a number in [{lo}, {hi}], got {shown(value)}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name} must be a number in [{lo}, {hi}], got {shown(value)}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise InputError(f"{name} must be in [{lo}, {hi}], got {shown(value)}")
    if integer:
        if v != int(v):
            raise InputError(f"{name} must be a whole number in [{lo}, {hi}], got {shown(value)}")
        return int(v)
    return v


def as_choice(value, name: str, choices):
    if not isinstance(value, (str, int, float, type(None))) or value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {shown(value)}")
    return value


def class_or_none(value, classes: int, word: str = "class") -> int | None:
    """'any' / None -> unconditional; '0'..str(classes - 1) -> that class index."""
    if value in (None, "", "any", "unconditional"):
        return None
    if classes < 1:
        raise InputError(f"this model is unconditional: the {word} must be 'any', got {shown(value)}")
    return as_number(value, word, 0, classes - 1, integer=True)


# -- jobs --------------------------------------------------------------------------------------

class Job:
    """One running job's stop signal: set by its session's Cancel button, or read from the request
    (`alive() is False` once the client cancelled or disconnected). Event-like: set(), is_set()."""

    def __init__(self, alive: Callable[[], bool] | None = None):
        self._flag = threading.Event()
        self._alive = alive

    def set(self) -> None:
        self._flag.set()

    def is_set(self) -> bool:
        return self._flag.is_set() or (self._alive is not None and not self._alive())

    def check(self) -> None:
        if self.is_set():
            raise Cancelled("cancelled")


class Jobs:
    """The running job of each session, by kind ("evaluation", "recompute"). Gradio's `cancels=` stops the page
    from waiting but cannot stop a worker thread; the job's progress callback checks its Job and stops it. A
    session runs one job at a time (a second is refused in one line), and a tab's Cancel stops only its kind."""

    def __init__(self):
        self._jobs: dict[str, tuple[str, Job]] = {}
        self._lock = threading.Lock()

    def start(self, session: str, alive: Callable[[], bool] | None = None, kind: str = "job") -> Job:
        job = Job(alive)
        with self._lock:
            running = self._jobs.get(session)
            if running is not None and not running[1].is_set():
                raise InputError(f"your {running[0]} is still running: cancel it or wait for it, then start this one")
            self._jobs[session] = (kind, job)
        return job

    def cancel(self, session: str, kind: str | None = None) -> bool:
        """Stop the session's running job (of this kind, if given); False if it has none."""
        with self._lock:
            running = self._jobs.get(session)
        if running is None or kind is not None and running[0] != kind:
            return False
        running[1].set()
        return True

    def finish(self, session: str, job: Job) -> None:
        with self._lock:
            if self._jobs.get(session, (None, None))[1] is job:
                del self._jobs[session]


def cancellable(progress, cancel: Job | threading.Event | None):
    """Wrap a progress callback so that it raises Cancelled once `cancel` is set."""
    if cancel is None:
        return progress

    def check(*args, **kwargs):
        if cancel.is_set():
            raise Cancelled("cancelled")
        if progress is not None:
            progress(*args, **kwargs)
    return check


CONFIRM_SECONDS = 30  # a page job estimated longer than this here starts on a second press (components.two_press)


def duration(seconds: float) -> str:
    """Seconds in words at a useful precision: '40 s', '3 min', '1 h 20 min'."""
    s = max(0, int(round(seconds)))
    if s < 90:
        return f"{s} s"
    m = round(s / 60)
    return f"{m} min" if m < 90 else f"{m // 60} h {m % 60} min"


class Stages:
    """Progress over a job's stages in proportion to their work (e.g. images × steps), with the time left
    estimated from the pace so far. `stage(name)` is that stage's (done, total) callback; `progress` receives
    (fraction, desc=...) like gr.Progress. A stage without work (cached) takes no share of the bar."""

    def __init__(self, progress, work: dict[str, float], desc: str, clock=time.monotonic):
        self.progress, self.desc, self.clock = progress, desc, clock
        total, acc = sum(work.values()), 0.0
        self.span = {}
        for name, w in work.items():
            self.span[name] = (acc / total, w / total) if total > 0 else (0.0, 0.0)
            acc += w
        self.t0 = clock()

    def stage(self, name: str, detail=None):
        """The stage's (done, total) callback; `detail(done, total)` adds to the description (e.g. "bin 3/50")."""
        lo, width = self.span[name]
        return lambda done, total: self.report(lo + width * done / max(total, 1),
                                               detail(done, total) if detail else "")

    def report(self, fraction: float, detail: str = "") -> None:
        if self.progress is None:
            return
        elapsed = self.clock() - self.t0
        left = f" · about {duration(elapsed * (1 - fraction) / fraction)} left" if fraction >= 0.02 else ""
        desc = f"{self.desc} {detail}".strip() if detail else self.desc
        self.progress(min(1.0, fraction), desc=desc + left)


def release_memory() -> None:
    """Hand freed memory back to the OS after a heavy job: glibc keeps freed arenas mapped otherwise,
    so the resident size only ever grows (1.9 GB after a burst of FIDs)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: list = []


def _malloc_trim():
    if not _TRIM:
        name = ctypes.util.find_library("c")
        try:
            _TRIM.append(getattr(ctypes.CDLL(name), "malloc_trim") if name else None)
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            _TRIM.append(None)
    return _TRIM[0]


# -- per-user state ----------------------------------------------------------------------------

DEFAULT_MODEL = "mnist"  # the registry id of the shipped U-Net


@dataclass(frozen=True)
class FIDPoint:
    label: str
    bytes: int
    pct_of_fp32: float
    fid_mean: float
    fid_ci95: float
    backend: str
    n: int
    steps: int = 0
    seeds: int = 0
    accuracy: float | None = None
    dfid_mean: float | None = None  # paired difference to FP32 (same seeds, same noise)
    dfid_ci95: float | None = None
    model: str = DEFAULT_MODEL  # which model it measured (the chart shows the selected model's)


@dataclass(frozen=True)
class UserSession:
    """One user's own state (kept in a gr.State). `fisher` None means the selected model's shipped map;
    a recomputed map belongs to the model it was computed on (a model switch drops it)."""
    fisher: FisherMap | None = None
    fisher_note: str = ""
    evaluations: tuple[FIDPoint, ...] = ()
    model: str = DEFAULT_MODEL

    def __post_init__(self):
        if self.fisher is not None and not isinstance(self.fisher, FisherMap):
            raise TypeError("UserSession.fisher must be a FisherMap or None")
        if not isinstance(self.model, str) or not self.model:
            raise TypeError("UserSession.model must be a model id (a non-empty str)")
        object.__setattr__(self, "evaluations", tuple(self.evaluations)[-MAX_EVALUATIONS:])

    def with_evaluations(self, points) -> "UserSession":
        kept = [p for p in self.evaluations if (p.label, p.n, p.steps, p.seeds) not in
                {(q.label, q.n, q.steps, q.seeds) for q in points}]
        return replace(self, evaluations=tuple(kept) + tuple(points))


def as_user(value) -> UserSession:
    """The session value as a UserSession (a fresh one where a client sent something else)."""
    return value if isinstance(value, UserSession) else UserSession()


# -- shared state ------------------------------------------------------------------------------

NO_FISHER = ("no Fisher map for this model: its folder has no fisher.safetensors and its lafq.json names no "
             "dataset to compute one from")


@dataclass
class AppState:
    """One model as every tab sees it: its adapter `den` (lafq.models.Denoiser: module, call, schedule,
    conditioning), its `card` (lafq.json: class names, datasets, guidance), and the folders its shipped files
    live in (`folder`: fisher.safetensors, classifier.safetensors, stats/; `report_dir`: report.csv,
    sensitivity.csv). The same class serves the project's U-Net and any diffusers model: what differs is
    data the adapter and the card declare. `fisher` None: no map (only NO_FISHER_STRATEGIES plan)."""
    den: object  # lafq.models.Denoiser
    card: ModelCard
    fisher: FisherMap | None
    fisher_note: str  # where the map came from (shipped, rough, none)
    folder: Path | None = None
    report_dir: Path | None = None
    shipped_map: bool = True  # the map is the one shipped with the model (a switch to it needs no note)
    model_id: str = DEFAULT_MODEL
    title: str = ""
    device: str = "cpu"
    lock: threading.Lock = field(default_factory=threading.Lock)
    heavy: threading.Lock = field(default_factory=threading.Lock)  # held by the worker thread while it computes
    _quantized: OrderedDict = field(default_factory=OrderedDict)
    fid_cache: OrderedDict = field(default_factory=OrderedDict)
    jobs: Jobs = field(default_factory=Jobs)
    _classifier: object = None
    _backend: object = None
    _memo: dict = field(default_factory=dict)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock)  # guards _memo_keys only
    _memo_keys: dict = field(default_factory=dict)  # key -> the lock its first caller computes under
    _step_seconds: float | None = None  # measured seconds per image per denoising step (`sample`)
    _pace_batch: int = 0  # the batch size it was measured at
    _fisher_seconds: float | None = None  # measured seconds per per-sample gradient (the last Fisher recompute)

    class_word = "class"

    def __post_init__(self):
        if not isinstance(self.card, ModelCard):
            raise TypeError("AppState.card must be a lafq.card.ModelCard")
        rows = self.den.conditioning.rows if self.den.conditioning is not None else 0
        null = self.den.null_row
        if not self.card.classes and rows:  # no names: every conditioning row before the null row is a numbered class
            self.card = replace(self.card, classes=tuple(str(i) for i in range(null if null is not None else rows)))
        self.title = self.title or self.card.name or "model"

    @property
    def model(self) -> torch.nn.Module:
        """The FP32 module (shared: never hooked, moved or replaced)."""
        return self.den.module

    @property
    def schedule(self):
        return self.den.schedule

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in conditioning-row order (the card's, else numbered)."""
        return self.card.classes

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance applies (the model has a null row)."""
        return self.den.null_row is not None

    @property
    def default_guidance(self) -> float:
        """The card's guidance where the model has a null row to guide with, else 1."""
        return self.card.guidance if self.guided else 1.0

    @property
    def default_class(self) -> str:
        """What Compare shows first: the card's example class, else the first class, else 'any'."""
        if self.card.example_class is not None:
            return str(self.classes.index(self.card.example_class))
        return "0" if self.classes else "any"

    @property
    def fisher_dataset(self) -> str | None:
        """The labelled images a recomputed Fisher map is scored on."""
        return self.card.dataset

    @property
    def reference(self) -> str:
        """The dataset whose FID reference statistics the model is scored against (lafq.metrics)."""
        name = self.card.reference or self.card.dataset
        if name is None:
            raise InputError(f"{self.title} names no reference dataset (lafq.json \"reference\"): no FID")
        return name

    @property
    def floor_images(self) -> str:
        """The real images of the real-vs-real floor."""
        return self.card.dataset or self.reference

    @property
    def stats_dir(self):
        """Where the reference statistics are cached: the model folder's stats/."""
        return self.folder / "stats" if self.folder is not None else None

    def _report_file(self, name: str):
        path = self.report_dir / name if self.report_dir is not None else None
        return path if path is not None and path.is_file() else None

    @property
    def report_csv(self):
        """This model's committed report rows (`report` writes report.csv), or None."""
        return self._report_file("report.csv")

    @property
    def sensitivity_csv(self):
        """This model's sensitivity validation (`report` writes sensitivity.csv), or None."""
        return self._report_file("sensitivity.csv")

    @property
    def own_sensitivity(self) -> bool:
        return self.sensitivity_csv is not None

    @property
    def has_classifier(self) -> bool:
        return self.folder is not None and (self.folder / "classifier.safetensors").is_file()

    @property
    def fid_features(self) -> str:
        from lafq.metrics import inception_weights_path
        return ("Inception features" if inception_weights_path() is not None
                else "the features of its shipped classifier (Inception where its weights are on disk)")

    @property
    def layers(self):
        """The model's layer vocabulary (lafq.layers): its layers in flow order, groups and first and last layers."""
        key = "layers"
        if key not in self._memo:
            from lafq.layers import layers_of
            self._memo[key] = layers_of(self.shapes)
        return self._memo[key]

    def layer_key(self, name: str) -> str:
        """The layer a parameter belongs to, as the Fisher tab groups rows (lafq.layers)."""
        return self.layers.layer(name)

    def label(self, value) -> int | None:
        """A class control's value -> a class index, or None for 'any' (unconditional)."""
        return class_or_none(value, len(self.classes), self.class_word)

    def denoiser(self, model: torch.nn.Module):
        """`model` (the FP32 model or a quantized copy) as the lafq.models.Denoiser that samples it."""
        return self.den if model is self.model else replace(self.den, module=model)

    def images(self, model: torch.nn.Module, spec) -> torch.Tensor:
        """uint8 (n, C, H, W) images from `model` (the FP32 model or a quantized copy) for a
        lafq.pipeline.SampleSpec: lafq.pipeline.generate, whose one noise rule the CLI and the report share,
        so the same spec and seed give the same noise for every model and plan."""
        from lafq.pipeline import generate
        return generate(self.denoiser(model), spec, device=self.device)[0]

    def sample(self, model: torch.nn.Module, spec) -> torch.Tensor:
        """`images`, timed: the pace on this machine feeds the estimate shown before a long job."""
        t0 = time.perf_counter()
        out = self.images(model, spec)
        self.record_pace(spec.n * spec.steps, time.perf_counter() - t0, min(spec.n, spec.batch_size))
        return out

    def record_pace(self, image_steps: int, seconds: float, batch: int) -> None:
        """A measured pace at this batch size. A larger batch replaces a smaller one's pace (long jobs sample in
        batches of 64-100, and a GPU is many times faster per image there than at 4); at the same batch size
        recent runs count most; a smaller batch's is ignored once a larger one's is known."""
        if image_steps <= 0 or seconds <= 0:
            return
        rate, (old, old_batch) = seconds / image_steps, (self._step_seconds, self._pace_batch)
        if old is None or batch > old_batch:
            self._step_seconds, self._pace_batch = rate, batch
        elif batch == old_batch:
            self._step_seconds = 0.7 * old + 0.3 * rate

    def seconds_per_image_step(self) -> float:
        """Measured sampling pace (seconds per image per step); a first call with nothing measured samples 4
        images × 4 steps to find out, after one untimed run (a first call's set-up, CUDA's above all, is no pace)."""
        if self._step_seconds is None:
            from lafq.pipeline import SampleSpec
            spec = SampleSpec(n=4, steps=4, seed=0, batch_size=4)
            self.images(self.model, spec)
            self.sample(self.model, spec)
        return self._step_seconds

    def save_quantized(self, path, model: torch.nn.Module) -> None:
        """Write a quantized model as lafq's CLI and library read it back (atomic)."""
        from lafq.quantize import save_quantized
        save_quantized(path, model)

    def _quantize(self, model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
        return quantize(model, plan)

    @property
    def shapes(self) -> dict:
        return param_shapes(self.model)

    @property
    def weights(self) -> dict:  # on the CPU, beside the Fisher map they are scored with
        return {n: p.detach().cpu() for n, p in self.model.named_parameters()}

    def fisher_of(self, user: UserSession | None) -> FisherMap:
        user = as_user(user)
        return user.fisher if user.fisher is not None else self.fisher

    def note_of(self, user: UserSession | None) -> str:
        user = as_user(user)
        return user.fisher_note if user.fisher is not None else self.fisher_note

    def plan(self, policy: Policy, fisher: FisherMap | None = None) -> Plan:
        from lafq.policy import NO_FISHER_STRATEGIES
        fm = fisher if fisher is not None else self.fisher
        if fm is None and policy.strategy not in NO_FISHER_STRATEGIES:
            raise InputError(f"{NO_FISHER}; strategies {list(NO_FISHER_STRATEGIES)} work without one")
        return make_plan(policy, fm, self.weights)  # no map: the plan needs only the model's tensors

    def size(self, plan: Plan):
        return size_report(plan, self.shapes)

    def private_model(self) -> torch.nn.Module:
        """A copy of the FP32 model for work that hooks or modifies it (Fisher): the shared one serves others."""
        return copy.deepcopy(self.model)

    def quantized(self, plan: Plan) -> torch.nn.Module:
        """The quantized model for a plan, built once and kept (a few, least recently used first out)."""
        key = plan_key(plan)
        with self.lock:
            if key in self._quantized:
                self._quantized.move_to_end(key)
                return self._quantized[key]
        base = copy.deepcopy(self.model).cpu()
        hooked = _hooked(base)  # never expected (the shared model is never hooked); a hooked copy must not be shared
        q = self._quantize(base, plan).to(self.device)  # quantized on the CPU, then moved
        if hooked:
            log.warning("the FP32 model carries hooks; not caching the quantized model for plan %s", key)
            return q
        with self.lock:
            self._quantized[key] = q
            while len(self._quantized) > MAX_QUANTIZED:
                self._quantized.popitem(last=False)
        return q

    def fid_result(self, key):
        with self.lock:
            if key in self.fid_cache:
                self.fid_cache.move_to_end(key)
                return self.fid_cache[key]
        return None

    def keep_fid_result(self, key, value) -> None:
        with self.lock:
            self.fid_cache[key] = value
            while len(self.fid_cache) > MAX_FID_RESULTS:
                self.fid_cache.popitem(last=False)

    @contextmanager
    def job(self, session: str, alive: Callable[[], bool] | None = None, heavy: bool = False, kind: str = "job"):
        """Run a job for `session`: yields its Job. heavy=True waits for the heavy slot (one job computing
        at a time, even a cancelled one that is still winding down) and frees memory afterwards."""
        job = self.jobs.start(session, alive, kind)
        held = False
        try:
            if heavy:
                # Poll so a job cancelled while it waits stops waiting (the wait, not a test, uses the timeout).
                while not (held := self.heavy.acquire(timeout=0.25)):
                    job.check()
            job.check()
            yield job
        finally:
            if held:
                self.heavy.release()
            self.jobs.finish(session, job)
            if heavy:
                release_memory()

    def memo(self, key, compute: Callable[[], object]):
        """compute() once per key for the process (arrival examples, real-vs-real floors); later callers of a
        key wait for its first and share its result, callers of other keys do not wait. Keys: the examples, and a
        floor per (N, seeds) a user evaluated at (N <= MAX_FID_N, seeds <= MAX_FID_SEEDS: bounded)."""
        if key in self._memo:  # done: no waiting behind another key's computation (a floor takes minutes)
            return self._memo[key]
        with self._memo_lock:
            lock = self._memo_keys.setdefault(key, threading.Lock())
        with lock:
            if key not in self._memo:
                self._memo[key] = compute()
            return self._memo[key]

    def memoized(self, key):
        """memo()'s value for `key` if it is computed already, else None (never waits, never computes)."""
        return self._memo.get(key)

    def classifier(self):
        """The model folder's classifier.safetensors (accuracy; FID features offline)."""
        if self._classifier is None:
            if not self.has_classifier:
                raise InputError("not available for this model: no classifier shipped")
            from lafq.classifier import load_classifier
            self._classifier = load_classifier(self.folder / "classifier.safetensors")[0]
        return self._classifier

    def backend(self):
        """FID features: Inception where its weights are on disk, else the model's own classifier."""
        if self._backend is None:
            from lafq.metrics import get_backend, inception_weights_path
            self._backend = (get_backend("inception") if inception_weights_path() is not None
                             else get_backend("classifier", model=self.classifier()))
        return self._backend


def _hooked(model: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in model.modules())


def plan_key(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(plan.precisions, sort_keys=True).encode()).hexdigest()[:16]


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def plan_label(plan: Plan, source: str | None = None) -> str:
    """A readable name for a plan (its policy in words; a loaded file's name), never a hash alone."""
    pol = plan.policy if isinstance(plan.policy, dict) else {}
    if isinstance(pol.get("label"), str) and pol["label"]:
        name = pol["label"][:60]
    else:
        s, target = pol.get("strategy"), pol.get("target", "?")
        name = {
            "uniform": f"uniform {target}",
            "global": f"global ≤ {_num(pol.get('threshold'))} → {target}",
            "groups": f"groups → {target}",
            "layer-ratio": f"layer-ratio p={_num(pol.get('p'))} → {target}",
            "layer-std": f"layer-std k={_num(pol.get('k'))} → {target}",
            "budget": f"budget {_num(pol.get('avg_bits'))} bits ({pol.get('statistic', '?')})",
            "random": f"random {_num(pol.get('avg_bits'))} bits",
        }.get(s, "custom plan")
        if pol.get("protect_mid") is True:
            name += ", mid kept"
    return f"{name} (from {source[:60]})" if source else name


QUICK_BINS, QUICK_SAMPLES = 4, 4  # a Fisher map computed on load when none is shipped: seconds, rough


def load_state(source=CHECKPOINT, fisher_path=None, quick_bins: int = QUICK_BINS, quick_samples: int = QUICK_SAMPLES,
               device: str = "auto", *, card: ModelCard | None = None, model_id: str = DEFAULT_MODEL,
               title: str = "", report_dir=None, heavy=None, jobs=None) -> AppState:
    """Any model as the app's state, through the one loader (lafq.load): a lafq `.safetensors` U-Net (default:
    the shipped one) or a diffusers pipeline-style folder. Its card is `card`, else the folder's lafq.json (a
    U-Net file's: the file's folder's); its shipped files are the folder's (`fisher_path` overrides the map).
    The model goes onto `device` ("auto" takes the GPU where there is one). A model that loads but cannot
    sample here (inputs the app does not supply) is refused in one line, once, instead of failing every
    Generate. A missing, unreadable or stale map gets a quick one from the card's dataset (a few seconds)
    and the note says so; with no dataset there is none (`fisher` None)."""
    from lafq.device import resolve_device
    from lafq.models import load

    dev = resolve_device(device)
    source = Path(source)
    is_file = source.suffix == ".safetensors" or source.is_file()
    folder = source.parent if is_file else source
    if report_dir is None:  # `report` writes FOLDER/report/; the shipped U-Net's report is the project's docs/
        report_dir = paths.DOCS if source.resolve() == Path(CHECKPOINT).resolve() else folder / "report"
    if card is None:
        card = ModelCard.read(folder) if is_file else check_folder(folder)
    den = load(source, subfolder=None if is_file else component_of(folder))
    if getattr(den.module, "lafq_plan", None) is not None:
        raise CheckpointError(f"{source.name} is a quantized model; the app needs the FP32 model")
    k = den.conditioning.rows if den.conditioning is not None else 0
    if card.null_class is not None and den.null_row != card.null_class:
        raise ValueError(f"null_class {card.null_class} is not a class embedding of this model ({k} embeddings)")
    if len(card.classes) > k:
        raise ValueError(f"lafq.json names {len(card.classes)} classes; the model has {k} class embeddings")
    try:
        with torch.no_grad():
            den.sample(1, steps=1, seed=0)
    except ImportError:
        raise  # a missing package: the registry says which
    except Exception as e:  # noqa: BLE001 -- whatever the model raises, the app answers in one line
        line = " ".join(str(e).split())[:160]
        raise ValueError(f"it loads but does not sample here ({type(e).__name__}: {line})") from None
    den.module.to(dev)
    fisher_path = Path(fisher_path) if fisher_path is not None else folder / "fisher.safetensors"
    fm, note, shipped = _fisher_for(den, fisher_path, card, quick_bins, quick_samples)
    extra = {k: v for k, v in (("heavy", heavy), ("jobs", jobs)) if v is not None}
    return AppState(den, card, fm, note, folder=folder, report_dir=report_dir, shipped_map=shipped,
                    model_id=model_id, title=title, device=str(dev), **extra)


def component_of(folder: Path) -> str | None:
    """The denoiser's subfolder of a pipeline-style folder (transformer/ or unet/), or None."""
    return next((c for c in ("transformer", "unet") if (folder / c / "config.json").is_file()), None)


# Bounds a listed folder must keep (its JSON files are read before anything loads): what the app can sample on
# a CPU in seconds, far above any model it is for (28x28 pixels, 1,000 steps, 1-4 channels, 10 classes).
MAX_SAMPLE_SIZE = 512
MAX_CHANNELS = 64
MAX_TRAIN_TIMESTEPS = 10_000


def _bounded(value, name: str, hi: int) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi for v in values):
        raise ValueError(f"{name} must be a whole number in [1, {hi:,}], got {shown(value)}")


def check_folder(folder: Path) -> ModelCard:
    """A diffusers pipeline-style folder's card; ValueError (one line) if it is not one, or if its configs ask
    for more than the app serves (sample size, channels, training timesteps: the MAX_* bounds)."""
    from lafq.card import read_json

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError("not a directory")
    component = component_of(folder)
    if component is None:
        raise ValueError("no unet/config.json or transformer/config.json: not a diffusers pipeline folder")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        raise ValueError("no scheduler/scheduler_config.json")
    config = read_json(folder / component / "config.json", f"{component}/config.json")
    sched = read_json(scheduler, "scheduler/scheduler_config.json")
    if not isinstance(config, dict) or not isinstance(sched, dict):
        raise ValueError("config.json and scheduler_config.json must hold objects")
    for key, hi in (("sample_size", MAX_SAMPLE_SIZE), ("in_channels", MAX_CHANNELS), ("out_channels", MAX_CHANNELS)):
        if config.get(key) is not None:
            _bounded(config[key], f"{component}/config.json {key}", hi)
    _bounded(sched.get("num_train_timesteps", 1000), "scheduler num_train_timesteps", MAX_TRAIN_TIMESTEPS)
    return ModelCard.read(folder)


def quick_fisher(den, dataset: str, bins: int, samples: int, per_class: bool = False, progress=None) -> FisherMap:
    """A Fisher map of `den` on real images of `dataset` (lafq.data; offline, its vendored subset when the full
    split is not installed: the map's meta["images"] names what was read). A class-conditional model (one
    with a null row) is scored on each image's own label, classes drawn in turn (the shipped MNIST map's
    recipe), the null class at the training dropout rate; `per_class` adds one map per class."""
    from lafq.data import load_dataset_or_subset
    from lafq.fisher import fisher_map

    data = load_dataset_or_subset(dataset)
    x, y = data.tensors()
    if tuple(x.shape[1:]) != den.sample_shape:
        raise ValueError(f"{data.name} images are {tuple(x.shape[1:])}; the model samples {den.sample_shape}")
    labelled = den.conditioning is not None and y is not None
    if per_class and not labelled:
        raise ValueError("per-class maps need a conditional model and labelled images")
    fm = fisher_map(den, x, labels=y if labelled else None, draws="balanced" if labelled else "uniform",
                    per_class=per_class, bins=bins, samples_per_bin=samples, method="hooks", progress=progress)
    fm.meta["images"] = data.name
    return fm


def _fisher_for(den, path: Path, card: ModelCard, bins: int, samples: int) -> tuple[FisherMap | None, str, bool]:
    """(map, note, shipped) for a model: its shipped map where it is readable and of these weights, else a quick
    one from the card's dataset, else none."""
    from lafq.data import DataError

    why = "no shipped Fisher map"
    if path.is_file():
        try:
            fm = FisherMap.load(path)
        except (CheckpointError, KeyError, TypeError, ValueError, IndexError) as e:  # a file missing keys is not a crash
            why = f"the shipped Fisher map {path.name} is unreadable ({shown(str(e))})"
        else:
            if fm.meta.get("checkpoint_digest") not in (None, state_digest(den.module)):
                why = "the shipped Fisher map was computed on other weights"
            elif set(fm.names) - {n for n, _ in den.module.named_parameters()}:
                why = "the shipped Fisher map names tensors this model lacks"
            else:
                groups = ", groups: all + per class" if len(fm.groups) > 1 else ""
                return fm, f"shipped map: {fm.bins} bins x {fm.meta.get('samples_per_bin')} samples{groups}", True
    if card.dataset is None:
        return None, f"{why}; {NO_FISHER}", False
    try:
        fm = quick_fisher(den, card.dataset, bins, samples)
    except (DataError, ValueError, OSError) as e:
        log.warning("no quick Fisher map for %s: %s", path.parent, e)
        return None, f"{why}, and none could be computed from {card.dataset} ({shown(str(e))})", False
    return fm, (f"{why}; using a rough {bins}-bin x {samples}-sample map from {fm.meta['images']} until you "
                "recompute (Fisher tab)"), False
