"""The models the app serves: the shipped MNIST U-Net, the shipped Fashion-MNIST diffusers model, and any
diffusers folder listed in LAFQ_MODELS. No gradio here: the registry is tested without a server.

Contracts:
- `discover()` lists, in this order: the MNIST U-Net ("mnist", always first and the default), the
  Fashion-MNIST folder `checkpoints/fashion` when it holds a model, then every directory in
  `LAFQ_MODELS` (`os.pathsep`-separated). An entry that is not a diffusers pipeline-style folder
  (`unet/` or `transformer/` with `config.json`, and `scheduler/scheduler_config.json`) or whose
  `lafq.json` is invalid is skipped with one logged warning line; discovery never raises.
- A model folder may hold `lafq.json` (`ModelInfo`: name, dataset, reference, classes, null_class,
  guidance), `fisher.safetensors` (a lafq.fisher.FisherMap of these weights), `classifier.safetensors`
  (a lafq.classifier model: FID features, accuracy) and `stats/` (cached FID reference statistics).
- `Registry.get(id)` loads a model once, lazily, into its own read-only state (`DiffusersState`, an
  AppState whose model is the diffusers module): the same contracts as AppState (never hooked or
  replaced; Fisher recomputes and quantization work on copies). All states share the MNIST state's
  heavy-job slot and job table: one heavy job computes at a time whichever model it is for, and Cancel
  finds a session's job whichever model the session selected since. A folder without a Fisher map
  gets a quick one on load (a few bins and samples) when it names a dataset; otherwise it has none
  (`fisher is None`): the Fisher tab says so, and only plans that need no Fisher map (uniform, random) work.
- A failure to load is an `InputError` with one line naming the model; the registry stays usable.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lafq import paths
from lafq.card import ModelCard, plain_name, read_json
from lafq.checkpoint import CheckpointError
from lafq.data import DataError
from lafq.fisher import FisherMap, state_digest
from lafq.plan import Plan

from .presets import NO_FISHER_STRATEGIES
from .state import DEFAULT_MODEL, AppState, InputError, UserSession, as_user, shown

log = logging.getLogger("lafq.app")

FASHION = paths.CHECKPOINTS / "fashion"
ENV = "LAFQ_MODELS"
INFO_FILE = "lafq.json"
QUICK_BINS, QUICK_SAMPLES = 4, 4  # a Fisher map computed on load: seconds, rough
NO_FISHER = ("no Fisher map for this model: its folder has no fisher.safetensors and its lafq.json names no "
             "dataset to compute one from")
# Bounds a listed folder must keep (its JSON files are read before anything loads): what the app can sample on
# a CPU in seconds, far above any model it is for (28x28 pixels, 1,000 steps, 1-4 channels, 10 classes).
MAX_SAMPLE_SIZE = 512
MAX_CHANNELS = 64
MAX_TRAIN_TIMESTEPS = 10_000


ModelInfo = ModelCard  # the app's name for a folder's lafq.json (lafq.card)


@dataclass(frozen=True)
class ModelEntry:
    """One selectable model: `path` None is the shipped MNIST U-Net."""
    id: str
    name: str
    path: Path | None = None
    info: ModelInfo = field(default_factory=ModelInfo)


def _component(folder: Path) -> str | None:
    return next((c for c in ("transformer", "unet") if (folder / c / "config.json").is_file()), None)


def _bounded(value, name: str, hi: int) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi for v in values):
        raise ValueError(f"{name} must be a whole number in [1, {hi:,}], got {shown(value)}")


def check_folder(folder: Path) -> ModelInfo:
    """A diffusers pipeline-style folder's ModelInfo; ValueError (one line) if it is not one, or if its configs
    ask for more than the app serves (sample size, channels, training timesteps: the MAX_* bounds)."""
    if not folder.is_dir():
        raise ValueError("not a directory")
    component = _component(folder)
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
    return ModelInfo.read(folder)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "model"


def discover(environ=None, fashion: Path = FASHION) -> tuple[ModelEntry, ...]:
    """The selectable models (see the module docstring); a bad entry is a warning line, never an error."""
    environ = os.environ if environ is None else environ
    entries = [ModelEntry(DEFAULT_MODEL, AppState.title)]
    seen: set[Path] = set()
    candidates = [("fashion", Path(fashion), False)] if fashion is not None else []
    candidates += [(None, Path(p), True) for p in environ.get(ENV, "").split(os.pathsep) if p.strip()]
    for wanted_id, folder, listed in candidates:
        if not listed and _component(folder) is None:
            continue  # the shipped Fashion-MNIST model is optional
        try:
            resolved = folder.resolve()
            info = check_folder(folder)
        except Exception as e:  # noqa: BLE001 -- a hostile folder (symlink loop, odd JSON) must never stop start-up
            line = " ".join(str(e).split())[:200] or type(e).__name__
            log.warning("%s entry %s skipped: %s", ENV if listed else "model folder", str(folder)[:200], line)
            continue
        if resolved in seen:
            continue
        seen.add(resolved)
        name = plain_name(info.name or folder.name)
        base = wanted_id or _slug(name)
        ids = {e.id for e in entries}
        mid = base if base not in ids else next(f"{base}-{i}" for i in range(2, 10**6) if f"{base}-{i}" not in ids)
        entries.append(ModelEntry(mid, name, folder, info))
    return tuple(entries)


# -- a diffusers model as the tabs see it --------------------------------------------------------

@dataclass
class DiffusersState(AppState):
    """A diffusers denoiser with what the tabs need (see AppState). `fisher` may be None (no map)."""
    den: object = None  # lafq.models.Denoiser around `model`, with class conditioning where the model has it
    info: ModelInfo = field(default_factory=ModelInfo)
    folder: Path | None = None
    model_id: str = "diffusers"
    title: str = "diffusers model"

    kind = "diffusers"
    class_word = "class"

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def default_guidance(self) -> float:
        return self.info.guidance

    @property
    def guided(self) -> bool:
        return self.den.null_row is not None

    @property
    def has_classifier(self) -> bool:
        return self.folder is not None and (self.folder / "classifier.safetensors").is_file()

    def plan(self, policy, fisher: FisherMap | None = None) -> Plan:
        from lafq.policy import make_plan
        fm = fisher if fisher is not None else self.fisher
        if fm is None and policy.strategy not in NO_FISHER_STRATEGIES:
            raise InputError(f"{NO_FISHER}; strategies {list(NO_FISHER_STRATEGIES)} work without one")
        return make_plan(policy, fm, self.weights)  # no map: the plan needs only the model's tensors

    has_inside = False
    own_sensitivity = False
    fid_features = "the features of its shipped classifier"

    @property
    def fisher_dataset(self) -> str | None:
        return self.info.dataset

    @property
    def default_class(self) -> str:
        return "0" if self.classes else "any"

    @property
    def report_csv(self):
        """`report --model` writes FOLDER/report/report.csv."""
        path = self.folder / "report" / "report.csv" if self.folder is not None else None
        return path if path is not None and path.is_file() else None

    @property
    def reference(self) -> str:
        name = self.info.reference or self.info.dataset
        if name is None:
            raise InputError(f"{self.title} names no reference dataset (lafq.json \"reference\"): no FID")
        return name

    @property
    def floor_images(self) -> str:
        return self.info.dataset or self.reference

    @property
    def stats_dir(self):
        return self.folder / "stats" if self.folder is not None else None

    def denoiser(self, model):
        return self.den if model is self.model else replace(self.den, module=model)

    def classifier(self):
        if self._classifier is None:
            if not self.has_classifier:
                raise InputError("not available for this model: no classifier shipped")
            from lafq.classifier import load_classifier
            self._classifier = load_classifier(self.folder / "classifier.safetensors")[0]
        return self._classifier

    def backend(self):
        if self._backend is None:
            from lafq.metrics import ClassifierBackend
            self._backend = ClassifierBackend(model=self.classifier())
        return self._backend


def load_model_state(entry: ModelEntry, *, device: str = "cpu", heavy=None, jobs=None,
                     quick_bins: int = QUICK_BINS, quick_samples: int = QUICK_SAMPLES) -> DiffusersState:
    """Load a diffusers folder into its own DiffusersState (see the module docstring)."""
    from lafq.models.diffusers_models import load_diffusers, with_class_conditioning

    folder = Path(entry.path)
    info = check_folder(folder)
    den = load_diffusers(folder, subfolder=_component(folder))  # no model_index.json needed
    plain = den
    den = with_class_conditioning(den, info.null_class)
    k = den.conditioning.rows if den.conditioning is not None else 0
    if info.null_class is not None and den is plain:
        raise ValueError(f"null_class {info.null_class} is not a class embedding of this model ({k} embeddings)")
    if len(info.classes) > k:
        raise ValueError(f"{INFO_FILE} names {len(info.classes)} classes; the model has {k} class embeddings")
    if not info.classes and k:  # no names: every embedding before the null class is a numbered class
        info = replace(info, classes=tuple(str(i) for i in range(info.null_class if info.null_class is not None else k)))
    try:  # once, here: a folder that loads but cannot sample (a text-conditioned U-Net, a class-conditional
        # transformer: inputs the app does not supply) is refused in one line instead of failing every Generate
        with torch.no_grad():
            den.sample(1, steps=1, seed=0)
    except ImportError:
        raise  # a missing package: the registry says which
    except Exception as e:  # noqa: BLE001 -- whatever the model raises, the registry answers in one line
        line = " ".join(str(e).split())[:160]
        raise ValueError(f"it loads but does not sample here ({type(e).__name__}: {line})") from None
    model = den.module.to(device)
    fm, note = _fisher_for(den, folder, info, quick_bins, quick_samples)
    extra = {k: v for k, v in (("heavy", heavy), ("jobs", jobs)) if v is not None}
    return DiffusersState(model=model, fisher=fm, fisher_note=note, device=str(device), schedule=den.schedule,
                          den=den, info=info, folder=folder, model_id=entry.id, title=entry.name, **extra)


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


def _fisher_for(den, folder: Path, info: ModelInfo, bins: int, samples: int) -> tuple[FisherMap | None, str]:
    path = folder / "fisher.safetensors"
    why = "no shipped Fisher map"
    if path.is_file():
        try:
            fm = FisherMap.load(path)
        except (CheckpointError, KeyError, TypeError, ValueError, IndexError) as e:
            why = f"the shipped Fisher map is unreadable ({shown(str(e))})"
        else:
            if fm.meta.get("checkpoint_digest") not in (None, state_digest(den.module)):
                why = "the shipped Fisher map was computed on other weights"
            elif set(fm.names) - {n for n, _ in den.module.named_parameters()}:
                why = "the shipped Fisher map names tensors this model lacks"
            else:
                return fm, f"shipped map: {fm.bins} bins x {fm.meta.get('samples_per_bin')} samples"
    if info.dataset is None:
        return None, f"{why}; {NO_FISHER}"
    try:
        fm = quick_fisher(den, info.dataset, bins, samples)
    except (DataError, ValueError, OSError) as e:
        log.warning("no quick Fisher map for %s: %s", folder, e)
        return None, f"{why}, and none could be computed from {info.dataset} ({shown(str(e))})"
    return fm, (f"{why}; using a rough {bins}-bin x {samples}-sample map from {fm.meta['images']} until you "
                "recompute")


class Registry:
    """The selectable models and their states, each loaded once on first use (thread-safe)."""

    def __init__(self, default: AppState, entries: tuple[ModelEntry, ...] | None = None):
        self.default = default
        self.entries = tuple(entries) if entries is not None else discover()
        if not self.entries or self.entries[0].id != DEFAULT_MODEL:
            self.entries = (ModelEntry(DEFAULT_MODEL, AppState.title), *[e for e in self.entries if e.id != DEFAULT_MODEL])
        self._states: dict[str, AppState] = {DEFAULT_MODEL: default}
        self._locks = {e.id: threading.Lock() for e in self.entries}

    def choices(self) -> list[tuple[str, str]]:
        """(shown name, id) pairs in order, for a dropdown."""
        return [(e.name, e.id) for e in self.entries]

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    def entry(self, model_id) -> ModelEntry:
        for e in self.entries:
            if e.id == model_id:
                return e
        raise InputError(f"model must be one of {self.ids}, got {shown(model_id)}")

    def get(self, model_id) -> AppState:
        entry = self.entry(model_id)
        state = self._states.get(entry.id)
        if state is not None:
            return state
        with self._locks[entry.id]:
            if entry.id not in self._states:
                try:
                    self._states[entry.id] = load_model_state(entry, device=self.default.device,
                                                              heavy=self.default.heavy, jobs=self.default.jobs)
                except ImportError as e:  # a package the model needs is missing, or another version of it
                    missing = (e.name or "").split(".")[0]
                    log.warning("model %s (%s) cannot import %s: %s", entry.id, entry.path, e.name, e)
                    if missing in ("lafq", "demo"):  # our own code is incomplete: no install fixes that
                        raise InputError(f"model {entry.name!r} could not be loaded: this copy of the app lacks the "
                                         f"module {shown(e.name)}") from None
                    if isinstance(e, ModuleNotFoundError):
                        raise InputError(f"model {entry.name!r} needs the package {shown(missing or str(e))}, which "
                                         "is not installed here: pip install -r requirements.txt") from None
                    raise InputError(f"model {entry.name!r} could not be loaded: {shown(' '.join(str(e).split()))} "
                                     "(another version of a package than requirements.txt pins?)") from None
                except (OSError, ValueError, RuntimeError, CheckpointError, DataError) as e:
                    line = " ".join(str(e).split())[:200] or type(e).__name__
                    log.warning("model %s (%s) could not be loaded: %s", entry.id, entry.path, line)
                    raise InputError(f"model {entry.name!r} could not be loaded: {line}") from None
            return self._states[entry.id]

    def state_for(self, user) -> AppState:
        """The state of the model a session selected (the default for a session without one)."""
        return self.get(as_user(user).model)

    def select(self, user, model_id) -> UserSession:
        """The session with another model selected: its recomputed Fisher map is dropped (it belongs to
        the other model's weights); its evaluations stay (each names its model)."""
        self.get(model_id)  # a model that cannot load is refused before the session changes
        user = as_user(user)
        if user.model == model_id:
            return user
        return replace(user, model=model_id, fisher=None, fisher_note="")
