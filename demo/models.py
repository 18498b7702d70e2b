"""The models the app serves: the shipped MNIST U-Net, the shipped Fashion-MNIST diffusers models, and any
diffusers folder listed in LAFQ_MODELS. No gradio here: the registry is tested without a server.

Contracts:
- `discover()` lists, in this order: the MNIST U-Net ("mnist", always first and the default), the
  Fashion-MNIST folders `checkpoints/fashion` (a U-Net) and `checkpoints/dit` (a DiT) when they hold a model,
  then every directory in `LAFQ_MODELS` (`os.pathsep`-separated). An entry that is not a diffusers pipeline-style folder
  (`unet/` or `transformer/` with `config.json`, and `scheduler/scheduler_config.json`) or whose
  `lafq.json` is invalid is skipped with one logged warning line; discovery never raises.
- A model folder (the shipped U-Net's is `checkpoints/`) may hold `lafq.json` (`ModelInfo`: name, dataset,
  reference, classes, null_class, guidance, example_class), `fisher.safetensors` (a lafq.fisher.FisherMap of these weights), `classifier.safetensors`
  (a lafq.classifier model: FID features, accuracy) and `stats/` (cached FID reference statistics).
- `Registry.get(id)` loads a model once, lazily, into its own read-only AppState (demo.state.load_state, the
  same loader as the default model's): never hooked or replaced; Fisher recomputes and quantization work on
  copies. All states share the MNIST state's
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

from lafq import paths
from lafq.card import ModelCard, plain_name
from lafq.checkpoint import CheckpointError
from lafq.data import DataError

from .state import (CHECKPOINT, DEFAULT_MODEL, AppState, InputError, UserSession, as_user, check_folder, component_of,
                    load_state, shown)

log = logging.getLogger("lafq.app")

FASHION = paths.CHECKPOINTS / "fashion"
DIT = paths.CHECKPOINTS / "dit"
SHIPPED = (("fashion", FASHION), ("dit", DIT))  # (id, folder): each listed when the checkout holds it
ENV = "LAFQ_MODELS"
INFO_FILE = "lafq.json"


ModelInfo = ModelCard  # the app's name for a folder's lafq.json (lafq.card)


@dataclass(frozen=True)
class ModelEntry:
    """One selectable model: `path` a lafq .safetensors U-Net or a diffusers pipeline-style folder."""
    id: str
    name: str
    path: Path = CHECKPOINT
    info: ModelInfo = field(default_factory=ModelInfo)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "model"


def default_entry() -> ModelEntry:
    """The shipped MNIST U-Net's entry (its name from checkpoints/lafq.json)."""
    info = ModelInfo.read(Path(CHECKPOINT).parent)
    return ModelEntry(DEFAULT_MODEL, plain_name(info.name or "MNIST U-Net"), Path(CHECKPOINT), info)


def discover(environ=None, shipped: tuple[tuple[str, Path], ...] = SHIPPED) -> tuple[ModelEntry, ...]:
    """The selectable models (see the module docstring); a bad entry is a warning line, never an error."""
    environ = os.environ if environ is None else environ
    entries = [default_entry()]
    seen: set[Path] = set()
    candidates = [(mid, Path(folder), False) for mid, folder in shipped]
    candidates += [(None, Path(p), True) for p in environ.get(ENV, "").split(os.pathsep) if p.strip()]
    for wanted_id, folder, listed in candidates:
        if not listed and component_of(folder) is None:
            continue  # the shipped diffusers models are optional
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


class Registry:
    """The selectable models and their states, each loaded once on first use (thread-safe)."""

    def __init__(self, default: AppState, entries: tuple[ModelEntry, ...] | None = None):
        self.default = default
        self.entries = tuple(entries) if entries is not None else discover()
        if not self.entries or self.entries[0].id != DEFAULT_MODEL:
            self.entries = (default_entry(), *[e for e in self.entries if e.id != DEFAULT_MODEL])
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
                    self._states[entry.id] = load_state(entry.path, device=self.default.device, model_id=entry.id,
                                                        title=entry.name, heavy=self.default.heavy,
                                                        jobs=self.default.jobs)
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
