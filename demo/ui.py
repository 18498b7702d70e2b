"""Assemble the tabs into one gr.Blocks; every handler runs behind `guard`."""
from __future__ import annotations

import functools
import logging

import gradio as gr

from lafq.checkpoint import CheckpointError
from lafq.data import DataError
from lafq.policy import Policy

from . import tab_compare, tab_fisher, tab_inside, tab_quality, tab_quantize
from .state import AppState, Cancelled
from .zerogpu import describe

log = logging.getLogger("lafq.app")
# How the app is served, shared by app.py and the server tests: no Node SSR server, errors shown to the user.
LAUNCH_OPTIONS = dict(ssr_mode=False, show_error=True)
QUEUE_OPTIONS = dict(default_concurrency_limit=2, max_size=64)


def guard(fn):
    """Bad input -> gr.Error with the message; anything unexpected -> a short gr.Error, traceback in the log."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, CheckpointError, DataError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from None
        except gr.Error:
            raise
        except Cancelled:
            raise gr.Error("cancelled") from None
        except Exception as e:  # the server keeps serving; the user sees what kind of failure it was
            log.exception("handler %s failed", getattr(fn, "__name__", fn))
            raise gr.Error(f"internal error ({type(e).__name__}); the server log has details") from None
    return wrapper


def build_app(state: AppState) -> gr.Blocks:
    with gr.Blocks(title="LAFQ: Fisher-guided quantization of a diffusion model") as demo:
        gr.Markdown("# LAFQ — layer-adaptive, Fisher-guided quantization\nSee where precision matters in a "
                    "class-conditional MNIST diffusion U-Net, tune a quantization plan, and measure what it costs. "
                    f"Computing on: {describe(state.device)}.")
        current = gr.State({"policy": Policy().to_dict()})
        with gr.Tab("Fisher", id="fisher"):
            fisher_fn, fisher_in, fisher_out = tab_fisher.build(state, guard)
        with gr.Tab("Quantize", id="quantize"):
            q_controls, q_fn, q_out = tab_quantize.build(state, current, guard)
        with gr.Tab("Compare", id="compare"):
            tab_compare.build(state, current, guard)
        with gr.Tab("Quality", id="quality"):
            tab_quality.build(state, current, guard)
        with gr.Tab("Inside", id="inside"):
            tab_inside.build(state, current, guard)
        # First paint: figures and readouts are computed when a page opens, not at server start.
        demo.load(guard(fisher_fn), fisher_in, fisher_out, api_visibility="undocumented")
        demo.load(guard(q_fn), q_controls, q_out, api_visibility="undocumented")
    return demo
