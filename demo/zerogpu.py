"""ZeroGPU support: `@gpu(duration=...)` marks a handler whose work wants the GPU.

Contract:
- Off ZeroGPU (a local run, a CPU Basic Space, any machine with its own GPU) or without the `spaces`
  package, `gpu(...)` returns the function itself: the app behaves exactly as without this module.
- On ZeroGPU (`spaces` importable and SPACES_ZERO_GPU set, as ZeroGPU Spaces set it) the app's process
  never touches CUDA (ZeroGPU forbids it outside decorated functions): the model stays on the CPU there
  (`host_device`), and each marked call runs through `spaces.GPU(duration=...)` in a worker process forked
  from the app, which moves its copy of the model to the GPU once and computes there.
- The marked functions take the app's `AppState` first. It does not cross the process boundary (it holds
  locks); the worker finds its forked copy by key, and the fields a call may change (`SYNCED`: the
  process-wide FID results) travel with the call both ways. Per-user data (a recomputed Fisher map, the
  user's evaluations) is an argument and a result of the call, so it crosses as the call's own values. Exceptions come back as themselves (a bad input keeps its
  one-line message). A `cancel` flag cannot cross processes: on ZeroGPU Cancel stops the page from waiting
  and the GPU call ends at its duration.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pickle

SYNCED = ("fid_cache",)  # the process-wide FID results; per-user data travels as arguments and results


def on_zerogpu() -> bool:
    flag = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
    return flag and importlib.util.find_spec("spaces") is not None


ON_ZEROGPU = on_zerogpu()
if ON_ZEROGPU:  # `spaces` must be imported before torch initialises CUDA; it patches torch for ZeroGPU
    import spaces  # noqa: F401


def host_device(requested: str) -> str:
    """The device the app's own process holds the model on: the CPU on ZeroGPU, else what was asked."""
    return "cpu" if ON_ZEROGPU else requested


def describe(device: str) -> str:
    return "ZeroGPU (a GPU attached per request)" if ON_ZEROGPU else str(device)


_STATES: dict[int, object] = {}  # id -> AppState; a forked worker finds the app's state here
WORKER_DEVICE = "cuda"  # where a worker computes (the tests stand in a forked CPU process for ZeroGPU)


def _to_gpu(state) -> None:
    """In the worker: the model on the GPU once; quantized models are rebuilt there."""
    if state.device != WORKER_DEVICE:
        state.model.to(WORKER_DEVICE)
        state.device = WORKER_DEVICE
        state._quantized.clear()


class _Raised:
    """An exception carried back from the worker as a value, so the app re-raises it unchanged."""

    def __init__(self, exc: BaseException):
        try:
            pickle.dumps(exc)
            self.exc = exc
        except Exception:
            self.exc = RuntimeError(f"{type(exc).__name__}: {exc}")


def _run_in_worker(fn, key, synced, args, kwargs):
    state = _STATES[key]
    for name, value in synced.items():
        setattr(state, name, value)
    try:
        _to_gpu(state)
        result = fn(state, *args, **kwargs)
    except Exception as e:
        return _Raised(e), {}
    return result, {name: getattr(state, name) for name in SYNCED}


def wrap(fn, duration, spaces_gpu):
    """`fn(state, ...)` as a call through `spaces_gpu` (spaces.GPU, or a stand-in in tests)."""
    def worker(key, synced, args, kwargs):
        return _run_in_worker(fn, key, synced, args, kwargs)
    worker.__name__ = worker.__qualname__ = fn.__name__

    def seconds(key, synced, args, kwargs):
        return duration(*args, **kwargs) if callable(duration) else duration
    in_gpu = spaces_gpu(duration=seconds)(worker)

    @functools.wraps(fn)
    def call(state, *args, **kwargs):
        kwargs.pop("cancel", None)  # a threading.Event: cannot reach another process
        _STATES[id(state)] = state
        result, synced = in_gpu(id(state), {n: getattr(state, n) for n in SYNCED}, args, kwargs)
        if isinstance(result, _Raised):
            raise result.exc
        with state.lock:
            for name, value in synced.items():
                setattr(state, name, value)
        return result
    return call


def gpu(duration=60):
    """Decorator: `duration` is seconds, or a function of the call's arguments (without the state) giving them."""
    def deco(fn):
        if not ON_ZEROGPU:
            return fn
        import spaces

        return wrap(fn, duration, spaces.GPU)
    return deco


def _number(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default  # the handler itself rejects it with the accepted range


def fisher_seconds(bins, samples, per_class=False, *_, **__) -> int:
    """A Fisher recompute: about 350 samples/s on a ZeroGPU slice (an H100 does 50 x 64 in 4.4 s), plus start-up."""
    work = _number(bins, 50) * _number(samples, 16) * (10 if per_class else 1)
    return int(min(900, max(30, 20 + work / 300)))


def fid_seconds(current, n, steps, seeds, include_fp32=True, *_, **__) -> int:
    """An FID evaluation: about 12,000 guided sample-steps/s on a ZeroGPU slice (an H100 does 25,000)."""
    work = _number(n, 200) * _number(steps, 20) * _number(seeds, 2) * (2 if include_fp32 else 1)
    return int(min(900, max(30, 20 + work / 10000)))
