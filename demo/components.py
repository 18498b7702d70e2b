"""Dropdowns and radios whose refusals quote at most a few dozen characters of a rejected value.

Gradio's Dropdown and Radio answer an unknown value with "Value: <the whole value> is not in the list of
choices", so a 1 MB string came back in the reply and the log. `Choice` / `RadioChoice` build the same
components with that one message shortened (an instance-level wrapper: a subclass would make Gradio
write a .pyi stub into this folder at import).
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
