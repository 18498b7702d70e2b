"""Gradio components with one behaviour each corrected, by instance-level wrappers (a subclass would make
Gradio write a .pyi stub into this folder at import).

- `Choice` / `RadioChoice`: Gradio's Dropdown and Radio answer an unknown value with "Value: <the whole
  value> is not in the list of choices", so a 1 MB string came back in the reply and the log; here the
  refusal quotes at most a few dozen characters.
- `UploadPath`: Gradio's File(type="filepath") creates an empty temporary file in its cache for every upload
  it hands over (and never uses or deletes it: one 0-byte file per upload); here the path is handed over
  without one.
"""
import functools

import gradio as gr

from .state import shown


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
