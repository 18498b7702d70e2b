"""Gradio components with one behaviour each corrected, by instance-level wrappers (a subclass would make
Gradio write a .pyi stub into this folder at import).

- `Choice` / `RadioChoice`: Gradio's Dropdown and Radio answer an unknown value with "Value: <the whole
  value> is not in the list of choices", so a 1 MB string came back in the reply and the log; here the
  refusal quotes at most a few dozen characters.
- `two_press`: a long job's button that first shows the job's estimate and starts it on a second press.
- `UploadPath`: Gradio's File(type="filepath") creates an empty temporary file in its cache for every upload
  it hands over (and never uses or deletes it: one 0-byte file per upload); here the path is handed over
  without one.
"""
import functools
import inspect

import gradio as gr

from .state import CONFIRM_SECONDS, duration, shown


def terse(component):
    """Wrap `component.preprocess` so that its refusal names the control, the choices and a cut value."""
    original = component.preprocess

    @functools.wraps(original)
    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            values = [v for _, v in component.choices]
            raise gr.Error(f"{component.label or 'value'} must be one of {values}, got {shown(payload)}") from None
    component.preprocess = preprocess
    return component


def Choice(*args, **kwargs) -> gr.Dropdown:  # noqa: N802 - reads like the component it builds
    return terse(gr.Dropdown(*args, **kwargs))


def RadioChoice(*args, **kwargs) -> gr.Radio:  # noqa: N802
    return terse(gr.Radio(*args, **kwargs))


def UploadPath(*args, **kwargs) -> gr.File:  # noqa: N802
    """A single-file gr.File whose handler receives the uploaded file's path (type="filepath")."""
    from gradio.utils import NamedString

    component = gr.File(*args, type="filepath", **kwargs)
    original = component._process_single_file

    def process(f):
        if component.file_types:  # Gradio's own check, and its refusal
            return original(f)
        return NamedString(f.path)
    component._process_single_file = process
    return component


def two_press(run, estimate, label: str, outputs: int, says: bool = False):
    """A page handler for a long job: the first press of its button with some settings shows the job's estimate
    (`estimate(*inputs) -> (seconds, line)`) and relabels the button "Start (about …)"; a second press with the
    same settings runs `run`. A job estimated at CONFIRM_SECONDS or less runs at once, and so does every job on
    ZeroGPU (the GPU call's own duration bounds it).

    `run(*inputs, <gr.Request / gr.Progress parameters>)` returns `outputs` values (and, with `says`, a last one
    for the estimate line's place: the job's own status line). The handler takes the same inputs followed by the
    page's armed state (a gr.State) and returns run's outputs, then the armed state, the button and the estimate
    line (last: guard(keep=…) puts a refusal there)."""
    from . import zerogpu

    sig = inspect.signature(run)
    params = list(sig.parameters.values())
    n = next((i for i, p in enumerate(params) if p.annotation is gr.Request or isinstance(p.default, gr.Progress)),
             len(params))

    def handler(*args):
        inputs, armed, special = args[:n], args[n], args[n + 1:]
        key = settings_key(inputs)
        if armed != key and not zerogpu.ON_ZEROGPU:
            seconds, line = estimate(*inputs)
            if seconds > CONFIRM_SECONDS:
                return (*[gr.skip()] * outputs, key, gr.Button(value=f"Start (about {duration(seconds)})"), line)
        result = run(*inputs, *special)
        result = result if isinstance(result, tuple) else (result,)
        line = result[-1] if says else ""
        return (*result[:outputs], None, gr.Button(value=label), line)
    handler.__signature__ = sig.replace(parameters=[*params[:n], inspect.Parameter(
        "armed", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params[n:]])
    handler.__annotations__ = dict(getattr(run, "__annotations__", {}))  # Gradio finds gr.Request by annotation
    handler.__name__ = getattr(run, "__name__", "run") + "_after_estimate"
    return handler


def settings_key(values) -> str:
    """A short digest of a job's settings: plain values as they are; a user's session by its model and map."""
    import hashlib

    def part(v):
        if v is None or isinstance(v, (str, int, float, bool, dict, list, tuple)):
            return repr(v)
        return f"{type(v).__name__}:{getattr(v, 'model', '')}:{getattr(v, 'fisher_note', '')}"
    return hashlib.sha256("|".join(part(v) for v in values).encode()).hexdigest()[:16]


def disarm(label: str):
    """The reset of a two_press button when a setting changes: (armed state, button, estimate line)."""
    return lambda: (None, gr.Button(value=label), "")
