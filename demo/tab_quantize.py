"""Quantize tab: presets, strategy and parameters -> live size readout, precision map, exports, loading files.

Contracts: the controls' values are validated here (they may come straight from the API); the plan
they describe follows the user's own Fisher map; a budget below what is possible is refused with the
floor named (the slider cannot go there); an uploaded plan or quantized model is checked completely
(every tensor, not only the plan) and never changes another user's plan; exports go to one folder per
session, replaced by that session's next export and deleted on exit.
"""
import atexit
import math
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from lafq.checkpoint import CheckpointError, read_bytes_checked
from lafq.fisher import STATISTICS
from lafq.planfile import read_plan
from lafq.policy import STRATEGIES, STRATEGY_DEFS, Plan, Policy, floor_bytes, param_shapes
from lafq.precision import PRECISIONS, numel
from lafq.quantize import quantized_from_file

from . import plots
from .presets import CUSTOM, DEFAULT_PRESET, PRESETS, default_preset, presets_for
from .serving import MAX_UPLOAD
from .state import AppState, InputError, as_choice, as_number, plan_key, plan_label, shown

LOG_MIN = -10.0  # threshold sliders are log10 of a fraction of the largest Fisher score; the minimum means 0
HOW_TO = ("**How to:** pick a preset (or a strategy and its settings); the size updates as you move the controls. "
          "The plan you see here is the one **Compare**, **Quality** and **Inside** use.")
THRESHOLD_INFO = "log10 of a fraction of the largest Fisher score; leftmost = 0: keep everything in FP32"
CONTROL_NAMES = ("strategy", "target", "statistic", "log_threshold", "log_encoder", "log_mid", "log_decoder", "p", "k",
                 "avg_bits", "protect_mid")
# The controls that set each Policy field; which a strategy shows follows from what it reads (lafq.policy.STRATEGY_DEFS).
FIELD_CONTROLS = {"target": ("target",), "statistic": ("statistic",), "threshold": ("log_threshold",),
                  "group_thresholds": ("log_encoder", "log_mid", "log_decoder"), "p": ("p",), "k": ("k",),
                  "avg_bits": ("avg_bits",), "protect_mid": ("protect_mid",)}
USES = {name: {c for f in s.reads for c in FIELD_CONTROLS.get(f, ())} for name, s in STRATEGY_DEFS.items()}


def _from_log(x: float) -> float:
    return 0.0 if x <= LOG_MIN else 10.0 ** x


def _to_log(x: float) -> float:
    return LOG_MIN if x <= 10 ** LOG_MIN else max(LOG_MIN, min(0.0, math.log10(x)))


def budget_floor_bits(state: AppState, protect_mid: bool) -> float:
    """The smallest average bits any budget plan reaches (int4 matrices, fp16 vectors, a protected middle block
    in fp32), rounded up to the slider's 0.1 step."""
    from lafq.layers import layers_of

    shapes = state.shapes
    protected = layers_of(shapes).in_group("mid") if protect_mid else set()
    lo, total = floor_bytes(shapes, protected), sum(numel(s) for s in shapes.values())
    bits = math.ceil(80 * lo / total - 1e-9) / 10
    while int(bits * total / 8) < lo:  # the budget in bytes is rounded down (lafq.policy.resolve_budget)
        bits = round(bits + 0.1, 1)
    return bits


def policy_from_controls(strategy, target, statistic, log_threshold, log_encoder, log_mid, log_decoder, p, k, avg_bits,
                         protect_mid) -> dict:
    """Validate UI values (they may come straight from the API) and return the policy as a dict."""
    strategy = as_choice(strategy, "strategy", STRATEGIES)
    target = as_choice(target, "target precision", PRECISIONS)
    statistic = as_choice(statistic, "timestep statistic", STATISTICS)
    logs = [as_number(v, name, LOG_MIN, 0.0) for v, name in
            [(log_threshold, "log10 threshold"), (log_encoder, "encoder log10 threshold"),
             (log_mid, "mid log10 threshold"), (log_decoder, "decoder log10 threshold")]]
    policy = Policy(strategy=strategy, target=target, statistic=statistic, threshold=_from_log(logs[0]),
                    group_thresholds={"encoder": _from_log(logs[1]), "mid": _from_log(logs[2]), "decoder": _from_log(logs[3])},
                    p=as_number(p, "p", 0.0, 1.0), k=as_number(k, "k", -5.0, 5.0),
                    avg_bits=as_number(avg_bits, "average bits", 4.0, 32.0) if strategy in ("budget", "random") else None,
                    protect_mid=bool(protect_mid) if isinstance(protect_mid, (bool, int)) else
                    as_choice(protect_mid, "protect the middle block", (True, False)))
    return {"policy": policy.to_dict()}


def shown_presets(state: AppState) -> list[str]:
    """The presets offered for the state's model (demo.presets.presets_for)."""
    return presets_for(state.fisher is not None)


def controls_for(state: AppState, name: str) -> list:
    """Control values for a preset (a budget below the model's floor is raised to it)."""
    kw = PRESETS[as_choice(name, "preset", shown_presets(state))]
    pol = Policy(**kw)
    bits = pol.avg_bits if pol.avg_bits is not None else 6.0
    bits = max(bits, budget_floor_bits(state, pol.protect_mid))
    return [pol.strategy, pol.target, pol.statistic, _to_log(pol.threshold), _to_log(pol.group_thresholds["encoder"]),
            _to_log(pol.group_thresholds["mid"]), _to_log(pol.group_thresholds["decoder"]), pol.p, pol.k, bits,
            pol.protect_mid]


def preset_shown(state: AppState, current: dict) -> str:
    """The preset the controls' plan is (as the preset would set the controls for this model), else CUSTOM: the
    preset box names what the controls hold as soon as one departs from a preset."""
    for name in shown_presets(state):
        if policy_from_controls(*controls_for(state, name)) == current:
            return name
    return CUSTOM


def preset_current(state: AppState, name: str | None = None) -> dict:
    """The shared-state value a preset gives (the app's starting plan; by default the model's default preset)."""
    return policy_from_controls(*controls_for(state, name or default_preset(state.fisher is not None)))


def model_note(state: AppState) -> str:
    """What is not offered for the selected model, and why (empty when everything is)."""
    if state.fisher is None:
        return f"**{state.title}** has no Fisher map: only uniform and random plans."
    return ""


def preset_of(policy: dict) -> str | None:
    """The preset whose policy this is, if any (names the plan)."""
    for name, kw in PRESETS.items():
        if Policy(**kw).to_dict() == policy:
            return name
    return None


def resolve_plan(state: AppState, current: dict | None, user=None) -> Plan:
    """The plan behind the tabs' shared state: a policy applied to the user's Fisher map, or an uploaded plan."""
    if not isinstance(current, dict) or not current:
        current = preset_current(state)
    try:
        if "plan" in current:
            plan = Plan(dict(current["plan"]), current.get("plan_policy", {}))
            plan.validate(state.shapes)
            return plan
        policy = Policy(**current["policy"])
        return state.plan(policy, state.fisher_of(user))
    except (TypeError, KeyError, AttributeError) as e:
        raise InputError(f"the current plan is malformed ({shown(str(e))}); pick a preset again") from None


def current_label(current: dict | None, plan: Plan) -> str:
    if isinstance(current, dict) and "plan" in current:
        return plan_label(plan, current.get("source") or "a file")
    return preset_of(plan.policy) or plan_label(plan)


def readout(state: AppState, current: dict, user=None) -> tuple[str, list[list], object]:
    """Size summary (markdown), per-dtype table rows, and the precision map figure."""
    plan = resolve_plan(state, current, user)
    rep = state.size(plan)
    fig = plan_figure(state, plan, user)
    md = (f"### {rep.total_bytes:,} bytes = **{rep.pct_of_fp32:.1f}% of FP32** ({rep.reduction_pct:.1f}% smaller)\n"
          f"{rep.avg_bits:.2f} bits per weight; FP32 is {rep.fp32_bytes:,} bytes; scales {rep.scale_bytes:,} bytes.\n\n"
          f"Plan: **{current_label(current, plan)}** (id `{plan_key(plan)}`).")
    if isinstance(current, dict) and "plan" in current:
        md += ("\n\nThis loaded plan is active on every tab. Moving any control or picking a preset replaces it "
               "with the plan the controls describe.")
    rows = [[p, rep.tensors_by_dtype[p], rep.params_by_dtype[p], rep.bytes_by_dtype[p]]
            for p in PRECISIONS if rep.tensors_by_dtype[p]]
    return md, rows, fig


def plan_figure(state: AppState, plan: Plan, user=None):
    """The plan layer by layer (rows in the Fisher heatmap's order) beside the Fisher score that chose it: the
    layer's element-weighted mean over tensors of the policy's timestep statistic (the mean without one)."""
    from .tab_fisher import layer_rows

    names = list(state.shapes)
    rows = layer_rows(state, None, names)
    sizes = [numel(state.shapes[n]) for n in names]
    params = {p: [sum(sizes[i] for i in idx if plan.precisions.get(names[i], "fp32") == p) for _, idx in rows]
              for p in PRECISIONS}
    fm = state.fisher_of(user)
    statistic = plan.policy.get("statistic", "mean") if isinstance(plan.policy, dict) else "mean"
    signal = None
    if fm is not None:
        score = fm.score(statistic if statistic in STATISTICS else "mean")
        top = max(score.values()) or 1.0
        signal = [sum(score.get(names[i], 0.0) * sizes[i] for i in idx) / max(1, sum(sizes[i] for i in idx)) / top
                  for _, idx in rows]
    title = (f"the plan by layer, beside the Fisher score that chose it ({statistic} over timesteps; "
             f"{len(names)} weight tensors)" if signal else f"the plan by layer ({len(names)} weight tensors; no Fisher map)")
    return plots.plan_by_layer([layer for layer, _ in rows], signal, "Fisher / max", params, title)


def visibility(strategy) -> list[bool]:
    """Which of the controls (in CONTROL_NAMES order) the strategy reads; the strategy itself always shows."""
    used = USES.get(strategy, set(CONTROL_NAMES))
    return [True] + [n in used for n in CONTROL_NAMES[1:]]


# -- exports ---------------------------------------------------------------------------------------

class Exports:
    """One export folder per session under a private root: a session's next export replaces its last,
    at most `keep` sessions' folders exist (oldest out), and the root is deleted when the process exits."""

    def __init__(self, keep: int = 16):
        self.root = Path(tempfile.mkdtemp(prefix="lafq-exports-"))
        self.keep = keep
        self._dirs: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()
        atexit.register(shutil.rmtree, self.root, True)

    def folder(self, session: str) -> Path:
        with self._lock:
            old = self._dirs.pop(session, None)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            new = Path(tempfile.mkdtemp(dir=self.root))
            self._dirs[session] = new
            while len(self._dirs) > self.keep:
                shutil.rmtree(self._dirs.popitem(last=False)[1], ignore_errors=True)
            return new

    def forget(self, session: str) -> None:
        with self._lock:
            old = self._dirs.pop(session, None)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


EXPORTS = Exports()


def export(state: AppState, current: dict, user=None, session: str = "local") -> list[str]:
    """Write the quantized model (.safetensors) and its plan (.json) for download (atomic writes)."""
    plan = resolve_plan(state, current, user)
    out = EXPORTS.folder(session)
    key = plan_key(plan)
    model_path, plan_path = out / f"lafq-quantized-{key}.safetensors", out / f"lafq-plan-{key}.json"
    state.save_quantized(model_path, state.quantized(plan))
    from dataclasses import replace

    from lafq.checkpoint import atomic_write_bytes, state_digest
    made_for = {"class": type(state.model).__name__, "digest": state_digest(state.model)}  # no server paths
    atomic_write_bytes(plan_path, replace(plan, model=made_for).to_json().encode())
    return [str(model_path), str(plan_path)]


# -- uploads ---------------------------------------------------------------------------------------

def load_upload(state: AppState, path: str | None) -> dict:
    """A plan (.json) or a quantized model (.safetensors) from the user -> their current plan.
    A model file is validated completely against the app's network (config, every tensor's name, shape,
    dtype and values), as the CLI does; only its plan is then used."""
    if not path or not isinstance(path, str):
        raise InputError("no file received; upload a plan .json or a quantized .safetensors made by lafq")
    p = Path(path)
    name = p.name[:80]
    if not p.is_file():
        raise InputError(f"{name}: no such file")
    size = p.stat().st_size
    if size > MAX_UPLOAD:
        raise InputError(f"{name} is {size / 2**20:.0f} MiB; the limit is {MAX_UPLOAD // 2**20} MiB")
    suffix = p.suffix.lower()
    if suffix not in (".json", ".safetensors"):
        raise InputError(f"{name}: accepted files are a plan .json or a quantized .safetensors")
    data = p.read_bytes()
    try:
        if suffix == ".json":
            plan = read_plan(data, name)
        else:
            tensors, meta = read_bytes_checked(data, name)
            if meta.get("kind") != "quantized":
                raise InputError(f"{name} holds a {shown(meta.get('kind'))}; upload a quantized model (or a plan .json)")
            plan = quantized_from_file(tensors, meta, name, like=state.model).lafq_plan
        plan.validate(param_shapes(state.model))
    except (CheckpointError, ValueError) as e:
        msg = str(e)
        raise InputError(msg if msg.startswith(name) else f"{name}: {msg}") from None
    return {"plan": plan.precisions, "plan_policy": plan.policy, "source": name}


def discard_upload(path) -> None:
    """Delete an uploaded file from Gradio's upload folder once read (accepted or refused): nothing lingers."""
    if not path or not isinstance(path, str):
        return
    try:
        from gradio.utils import get_upload_folder
        folder = Path(get_upload_folder()).resolve()
        p = Path(path).resolve()
    except (ImportError, OSError):
        return
    if folder in p.parents:
        p.unlink(missing_ok=True)
        try:
            p.parent.rmdir()  # Gradio keeps each upload in its own folder
        except OSError:
            pass


def build(models, current, user, guard):
    """The tab for a demo.models.Registry; every handler works on the model the user's session selected.
    Returns (readout inputs, readout handler, its outputs, (refresh, its inputs, its outputs)): `refresh(user)`
    sets the presets and controls to the selected model's default after a model switch."""
    import gradio as gr

    from .components import Choice, RadioChoice, UploadPath

    state = models.default
    start = controls_for(state, DEFAULT_PRESET)
    floor = budget_floor_bits(state, False)
    gr.Markdown(HOW_TO, elem_id="howto-quantize")
    note = gr.Markdown(model_note(state), elem_id="quantize-note")
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            # The size readout heads the controls' column: on a phone it stays next to the sliders.
            warning = gr.Markdown(elem_id="quantize-warning")
            summary = gr.Markdown(elem_id="size-readout")
            preset = Choice([*PRESETS, CUSTOM], value=DEFAULT_PRESET, label="preset", elem_id="preset")
            strategy = Choice(list(STRATEGIES), value=start[0], label="strategy")
            vis = visibility(start[0])
            target = Choice(list(PRECISIONS[1:]), value=start[1], label="target precision", visible=vis[1])
            statistic = RadioChoice(list(STATISTICS), value=start[2], label="Fisher over timesteps", visible=vis[2])
            log_thr = gr.Slider(LOG_MIN, 0, value=start[3], step=0.05, label="global: log10 threshold", visible=vis[3],
                                info=THRESHOLD_INFO)
            log_enc = gr.Slider(LOG_MIN, 0, value=start[4], step=0.05, label="groups: encoder (embed, stem, down1-3)",
                                visible=vis[4], info=THRESHOLD_INFO)
            log_mid = gr.Slider(LOG_MIN, 0, value=start[5], step=0.05, label="groups: mid", visible=vis[5])
            log_dec = gr.Slider(LOG_MIN, 0, value=start[6], step=0.05, label="groups: decoder (up3-1, head)",
                                visible=vis[6])
            p = gr.Slider(0, 1, value=start[7], step=0.01, label="layer-ratio: p", visible=vis[7])
            k = gr.Slider(-3, 3, value=start[8], step=0.05, label="layer-std: k (below mean + k std of log Fisher)",
                          visible=vis[8])
            # Up to 8 bits: the useful range (16 and 32 bits are the uniform FP16 / FP32 plans).
            bits = gr.Slider(floor, 8, value=start[9], step=0.1, visible=vis[9],
                             label=f"budget / random: average bits per weight (≥ {floor:.1f}: int4 everywhere possible)")
            protect = gr.Checkbox(start[10], label="protect the middle block", visible=vis[10])
        with gr.Column(scale=2, min_width=300):
            table = gr.Dataframe(headers=["dtype", "tensors", "params", "bytes"], interactive=False)
            pmap = gr.Plot(show_label=False)
            with gr.Row():
                export_btn = gr.Button("Export model + plan")
                files = gr.File(label="downloads", file_count="multiple", interactive=False, visible=False)  # until
                # there is something to download: an empty box took 190 px
            # No file_types: Gradio would refuse other files before the handler, leaving them in its upload
            # folder; the handler names what is accepted and deletes every upload once read.
            upload = UploadPath(label="load a plan (.json) or quantized model (.safetensors)", elem_id="upload")
            upload_note = gr.Markdown(elem_id="upload-note")
    controls = [strategy, target, statistic, log_thr, log_enc, log_mid, log_dec, p, k, bits, protect]
    outputs = [current, summary, table, pmap]

    def on_change(*vals):
        *vals, usr = vals
        cur = policy_from_controls(*vals)
        return (cur, *readout(models.state_for(usr), cur, usr))

    def on_change_inline(*vals):
        *ctrl, box, usr = vals
        cur, *rest = on_change(*ctrl, usr)
        name = preset_shown(models.state_for(usr), cur)
        # The preset box is written only when its name changes: rewriting it on every readout re-renders an open
        # list under the user's pointer. The last output clears an earlier inline warning.
        return (cur, *rest, gr.skip() if name == box else name, "")
    # One event for all the controls, not one per control: a preset sets up to 11 controls at once, and
    # separate events (each run with the values it saw when it fired) could finish out of order and leave a
    # readout of a half-applied preset. With one event, "always_last" runs it again after the running one,
    # with the final values. A refused value (a budget below the floor) keeps the last good readout and
    # says why inline.
    gr.on([c.change for c in controls], guard(on_change_inline, keep=len(outputs) + 1), [*controls, preset, user],
          [*outputs, preset, warning], trigger_mode="always_last", concurrency_id="readout", concurrency_limit=4,
          show_progress="hidden", api_visibility="private")
    strategy.change(lambda s: [gr.update(visible=v) for v in visibility(s)[1:]], strategy, controls[1:],
                    api_visibility="private", queue=False)

    def floor_for(protect_mid, value, usr):
        lo = budget_floor_bits(models.state_for(usr), bool(protect_mid))
        return gr.Slider(minimum=lo, value=max(lo, float(value)),
                         label=f"budget / random: average bits per weight (≥ {lo:.1f}: int4 everywhere possible)")
    protect.change(guard(floor_for), [protect, bits, user], bits, api_visibility="private")
    preset.input(guard(lambda name, usr: controls_for(models.state_for(usr), name) if name != CUSTOM
                       else [gr.skip()] * len(controls)), [preset, user], controls, api_visibility="private")
    # One named endpoint for the API: the same computation as the live readout.
    readout_btn = gr.Button("refresh readout", visible=False)
    readout_btn.click(guard(on_change), [*controls, user], outputs, api_name="quantize_readout",
                      concurrency_id="readout", concurrency_limit=4)

    def run_export(cur, usr, request: gr.Request):
        return gr.File(value=export(models.state_for(usr), cur, usr, session=request.session_hash), visible=True)
    # Its own queue: an export takes seconds and must not wait behind another user's long evaluation.
    export_btn.click(guard(run_export), [current, user], files, api_name="export", concurrency_id="export",
                     concurrency_limit=2)

    def on_upload(f, usr):
        try:
            st = models.state_for(usr)
            cur = load_upload(st, f)
        finally:
            discard_upload(f)
        return (cur, *readout(st, cur, usr))
    def on_upload_inline(f, usr):
        return (*on_upload(f, usr), gr.skip(), "")
    # In the page a refused file leaves the readout as it was, empties the box and says why under it; the named
    # endpoint (a hidden button) answers an API client with an error instead.
    upload.upload(guard(on_upload_inline, keep=len(outputs), clear=1), [upload, user], [*outputs, upload, upload_note],
                  concurrency_id="readout", api_visibility="private")
    load_btn = gr.Button("load plan (API)", visible=False)
    load_btn.click(guard(on_upload), [upload, user], outputs, api_name="load_plan", concurrency_id="readout")

    def refresh(usr):
        st = models.state_for(usr)
        name = default_preset(st.fisher is not None)
        vals = controls_for(st, name)
        lo = budget_floor_bits(st, False)
        bits_update = gr.Slider(minimum=lo, value=vals[9],
                                label=f"budget / random: average bits per weight (≥ {lo:.1f}: int4 everywhere possible)")
        return (model_note(st), gr.Dropdown(choices=[*shown_presets(st), CUSTOM], value=name),
                *vals[:9], bits_update, vals[10], "")
    return [*controls, user], on_change, outputs, (refresh, [user], [note, preset, *controls, warning])
