"""Assemble the tabs into one gr.Blocks; every handler runs behind `guard`, the one place errors become messages.

Per-user state: `current` (the plan every tab uses) and `user` (the selected model, the user's own Fisher
map and evaluations) are gr.State, so one user's actions never change another's. The model selector at the
top changes only its user's session; every tab then re-labels its model-dependent controls (each tab's
`refresh`) and works on that model (demo.models.Registry). Internal events are private (not callable
from the API); the named endpoints are the ones `docs/app.md` and the tests list.
"""
from __future__ import annotations

import functools
import logging
import threading

import gradio as gr

from lafq.checkpoint import CheckpointError
from lafq.data import DataError

from . import tab_compare, tab_fisher, tab_inside, tab_quality, tab_quantize, zerogpu
from .components import Choice
from .models import Registry
from .serving import DELETE_CACHE, LAUNCH_OPTIONS, QUEUE_OPTIONS  # noqa: F401  (app.py and tests import them here)
from .state import AppState, Cancelled, UserSession, as_user, public_text, shown
from .zerogpu import describe

log = logging.getLogger("lafq.app")
RESIZE_JS = "() => { requestAnimationFrame(() => window.dispatchEvent(new Event('resize'))); }"


def _one_line(e: Exception) -> str:
    msg = public_text(" ".join(str(e).split())) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:300] + "…"


def guard(fn, *, keep: int | None = None, clear: int = 0):
    """Bad input -> gr.Error with the message; anything unexpected -> a short gr.Error, traceback in the log.
    keep=n: a bad input instead leaves the first n outputs as they were, empties the next `clear` (a refused
    upload's box) and puts the message in the last output (an inline warning that stays, beside the last good
    result). A cancelled job is news, not an error: an info line, and every output stays as it was."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, CheckpointError, DataError, FileNotFoundError) as e:
            if keep is not None:
                return (*[gr.skip()] * keep, *[None] * clear, f"⚠️ {_one_line(e)}")
            raise gr.Error(_one_line(e)) from None
        except gr.Error:
            raise
        except Cancelled:
            gr.Info("Cancelled: nothing was recorded.")
            return gr.skip()
        except Exception as e:  # the server keeps serving; the user sees what kind of failure it was
            log.exception("handler %s failed", getattr(fn, "__name__", fn))
            raise gr.Error(f"internal error ({type(e).__name__}); the server log has details") from None
    return wrapper


def switch_note(old: AppState, new: AppState, current) -> str:
    """The line beside the model selector after a switch: where the new model's map comes from, and, when the
    user had a plan of their own, that it stayed with the old model (a plan names one model's tensors)."""
    lines = [] if new.shipped_map else [f"{new.title}: {new.fisher_note}"]
    if isinstance(current, dict) and current != tab_quantize.preset_current(old):
        lines.insert(0, f"**Your plan was reset:** it was made for {old.title}, and a plan names one model's tensors. "
                        f"{new.title} starts from its default plan (as {old.title} will if you switch back).")
    return "  \n".join(lines)


def warm_up(state: AppState) -> threading.Thread:
    """Compute the default model's first screen in the background while the server starts (app.py), so the first
    visitor waits for nothing (about 4 s on 2 cores otherwise); every page then shares it (state.memo). A failure
    is logged, and the page's own load reports it again."""
    def run():
        if zerogpu.ON_ZEROGPU:  # sampling there asks for a GPU slice: only inside a visitor's request
            return
        try:
            tab_compare.hero(state)
        except Exception:  # noqa: BLE001
            log.exception("warm-up of the first screen failed")
    thread = threading.Thread(target=run, name="lafq-warm-up", daemon=True)
    thread.start()
    return thread


def build_app(state: AppState, models: Registry | None = None) -> gr.Blocks:
    """The app for the MNIST U-Net's `state` and the registry's other models (by default those
    demo.models.discover finds: checkpoints/fashion, LAFQ_MODELS)."""
    models = models if models is not None else Registry(state)
    with gr.Blocks(title="LAFQ: Fisher-guided quantization of a diffusion model", delete_cache=DELETE_CACHE) as demo:
        # The first screen: a one-line title, the model selector, and the arrival example (FP32 · Fisher plan ·
        # uniform at the same size, one labelled picture) before any tab; computed at start-up (below).
        gr.Markdown("### LAFQ — Fisher-guided quantization of diffusion models\n"
                    f"See where precision matters, tune a plan, measure what it costs (computing on "
                    f"{describe(state.device)}).", elem_id="title")
        current = gr.State(tab_quantize.preset_current(state))
        user = gr.State(UserSession())
        with gr.Row(equal_height=True):
            model = Choice(models.choices(), value=models.default.model_id, label="model", elem_id="model",
                           interactive=len(models.entries) > 1, scale=1, min_width=220)
            model_status = gr.Markdown(elem_id="model-status")
        hero_img = gr.Image(show_label=False, elem_id="hero", interactive=False, format="png", buttons=[],
                            container=False)
        hero_line = gr.Markdown(elem_id="hero-line")
        with gr.Tab("Fisher", id="fisher") as t1:
            fisher_fn, fisher_in, fisher_out, fisher_refresh = tab_fisher.build(models, user, guard)
        with gr.Tab("Quantize", id="quantize") as t2:
            q_in, q_fn, q_out, q_refresh = tab_quantize.build(models, current, user, guard)
        with gr.Tab("Compare", id="compare") as t3:
            example_fn, example_out, compare_refresh = tab_compare.build(models, current, user, guard)
        with gr.Tab("Quality", id="quality") as t4:
            quality_refresh = tab_quality.build(models, current, user, guard)
        with gr.Tab("Inside", id="inside") as t5:
            (inside_fn, inside_out), inside_refresh, (show_fn, show_in, show_out) = tab_inside.build(
                models, current, user, guard)
        # Inside's views of the session's model are computed when the tab is opened, not on a model switch.
        t5.select(guard(show_fn), show_in, show_out, api_visibility="private", concurrency_id="sample",
                  show_progress="minimal")
        for tab in (t1, t2, t3, t4, t5):
            # A figure drawn while its tab was hidden (a model switch redraws every tab) took a default width
            # (half the page): re-measure once the tab shows.
            tab.select(None, None, None, js=RESIZE_JS, api_visibility="private", queue=False)
        # First paint: figures and readouts when a page opens; the Compare and Inside examples are computed
        # once per process and kept.
        demo.load(guard(fisher_fn), fisher_in, fisher_out, api_visibility="private")
        demo.load(guard(q_fn), q_in, q_out, api_visibility="private")
        def show_hero(usr):
            img, line = tab_compare.hero(models.state_for(usr))
            return line, tab_compare.tagged(img)  # a file of its own per response, as every Compare image
        demo.load(guard(show_hero), user, [hero_line, hero_img], api_visibility="private", show_progress="minimal")
        for fn, out in ((example_fn, example_out), (inside_fn, inside_out)):
            demo.load(guard(fn), None, out, api_visibility="private", concurrency_id="sample", show_progress="minimal")

        # A model switch: this user's session only, then each tab follows (its controls, then its figures).
        def select(model_id, usr, cur):
            old = models.state_for(usr)
            new = models.select(usr, model_id)
            st = models.state_for(new)
            if new.model == as_user(usr).model:
                return new, cur, gr.skip()
            return new, tab_quantize.preset_current(st), switch_note(old, st, cur)
        # Its own queue: a model's first selection loads it (seconds), which must not stall every user's readouts.
        ev = model.input(guard(select), [model, user, current], [user, current, model_status], api_name="select_model",
                         concurrency_id="load", concurrency_limit=2)
        # `.success`: a model that fails to load leaves the session and every tab as they were (the error says why).
        for fn, inputs, outputs in (fisher_refresh, q_refresh, compare_refresh, quality_refresh, inside_refresh):
            ev = ev.success(guard(fn), inputs, outputs, api_visibility="private")
        ev = ev.success(guard(fisher_fn), fisher_in, fisher_out, api_visibility="private")
        ev = ev.success(guard(q_fn), q_in, q_out, api_visibility="private")
        ev.success(guard(show_hero), user, [hero_line, hero_img], api_visibility="private", concurrency_id="sample")

        def forget(request: gr.Request):  # a closed page's export folder goes at once, not at shutdown
            tab_quantize.EXPORTS.forget(request.session_hash)
        demo.unload(forget)
    return demo


__all__ = ["build_app", "warm_up", "guard", "LAUNCH_OPTIONS", "QUEUE_OPTIONS", "shown"]
