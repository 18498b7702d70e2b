"""Quantize tab: strategy and parameters -> live size readout, precision map, exports."""
from __future__ import annotations

import tempfile
from pathlib import Path

from lafq.checkpoint import CheckpointError, read_bytes_checked
from lafq.fisher import STATISTICS
from lafq.policy import STRATEGIES, Plan, Policy
from lafq.precision import PRECISIONS
from lafq.quantize import save_quantized

from . import plots
from .state import AppState, InputError, as_choice, as_number, plan_key

LOG_MIN = -10.0  # threshold sliders are log10 of a fraction of the largest Fisher score; the minimum means 0
MAX_UPLOAD = 64 * 1024 * 1024


def _from_log(x: float) -> float:
    return 0.0 if x <= LOG_MIN else 10.0 ** x


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
                    protect_mid=bool(protect_mid))
    return {"policy": policy.to_dict()}


def resolve_plan(state: AppState, current: dict | None) -> Plan:
    """The plan behind the tabs' shared state: a policy to apply to the Fisher map, or an uploaded plan."""
    if not current:
        current = {"policy": Policy().to_dict()}
    try:
        if "plan" in current:
            plan = Plan(dict(current["plan"]), current.get("plan_policy", {}))
            plan.validate(state.shapes)
            return plan
        return state.plan(Policy(**current["policy"]))
    except (TypeError, KeyError) as e:
        raise InputError(f"the current plan is malformed ({e}); pick a strategy again") from None


def readout(state: AppState, current: dict) -> tuple[str, list[list], object]:
    """Size summary (markdown), per-dtype table rows, and the precision map figure."""
    plan = resolve_plan(state, current)
    rep = state.size(plan)
    names = list(state.shapes)
    from lafq.precision import numel
    fig = plots.precision_map(names, [plan.precisions.get(n, "fp32") for n in names],
                              [numel(state.shapes[n]) for n in names])
    budget_note = ""
    pol = plan.policy or {}
    if pol.get("strategy") in ("budget", "random") and pol.get("avg_bits"):
        budget_note = f" (budget {pol['avg_bits']:.2f} bits)"
    md = (f"### {rep.total_bytes:,} bytes = **{rep.pct_of_fp32:.1f}% of FP32** ({rep.reduction_pct:.1f}% smaller)\n"
          f"{rep.avg_bits:.2f} bits per weight{budget_note}; FP32 is {rep.fp32_bytes:,} bytes; "
          f"scales {rep.scale_bytes:,} bytes. Plan `{plan_key(plan)}`.")
    rows = [[p, rep.tensors_by_dtype[p], rep.params_by_dtype[p], rep.bytes_by_dtype[p]]
            for p in PRECISIONS if rep.tensors_by_dtype[p]]
    return md, rows, fig


def export(state: AppState, current: dict) -> list[str]:
    """Write the quantized model (.safetensors) and its plan (.json) for download."""
    plan = resolve_plan(state, current)
    out = Path(tempfile.mkdtemp(prefix="lafq-export-"))
    key = plan_key(plan)
    model_path, plan_path = out / f"lafq-quantized-{key}.safetensors", out / f"lafq-plan-{key}.json"
    save_quantized(model_path, state.quantized(plan))
    plan_path.write_text(plan.to_json())
    return [str(model_path), str(plan_path)]


def load_upload(state: AppState, path: str | None) -> dict:
    """A plan (.json) or a quantized model (.safetensors) from the user -> the shared current plan."""
    if not path:
        raise InputError("no file received; upload a plan .json or a quantized .safetensors made by lafq")
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_UPLOAD:
        raise InputError(f"file is {size / 2**20:.0f} MiB; the limit is {MAX_UPLOAD // 2**20} MiB")
    data = p.read_bytes()
    if p.suffix.lower() == ".json":
        try:
            plan = Plan.from_json(data.decode("utf-8", errors="strict"))
        except (UnicodeDecodeError, ValueError) as e:
            raise InputError(f"{p.name}: {e}") from None
    elif p.suffix.lower() == ".safetensors":
        try:
            _, meta = read_bytes_checked(data, p.name)
        except CheckpointError as e:
            raise InputError(str(e)) from None
        if meta.get("kind") != "quantized" or "plan" not in meta:
            raise InputError(f"{p.name} holds a {meta.get('kind')!r}; upload a quantized model (or a plan .json)")
        plan = Plan(dict(meta["plan"].get("precisions", {})), meta["plan"].get("policy", {}))
    else:
        raise InputError(f"{p.name}: accepted files are a plan .json or a quantized .safetensors")
    try:
        plan.validate(state.shapes)
    except ValueError as e:
        raise InputError(f"{p.name}: {e}") from None
    return {"plan": plan.precisions, "plan_policy": plan.policy}


def build(state: AppState, current, guard):
    import gradio as gr

    gr.Markdown("Pick a strategy; sizes update as the controls move. Thresholds are log10 of a fraction of the "
                "largest Fisher score (leftmost = 0: keep everything in FP32).")
    with gr.Row():
        with gr.Column(scale=1):
            strategy = gr.Dropdown(list(STRATEGIES), value="layer-ratio", label="strategy")
            target = gr.Dropdown(list(PRECISIONS[1:]), value="fp16", label="target precision")
            statistic = gr.Radio(list(STATISTICS), value="final", label="Fisher over timesteps")
            log_thr = gr.Slider(LOG_MIN, 0, value=-2, step=0.05, label="global: log10 threshold")
            log_enc = gr.Slider(LOG_MIN, 0, value=LOG_MIN, step=0.05, label="groups: encoder (embed, stem, down1-3)")
            log_mid = gr.Slider(LOG_MIN, 0, value=0, step=0.05, label="groups: mid")
            log_dec = gr.Slider(LOG_MIN, 0, value=0, step=0.05, label="groups: decoder (up3-1, head)")
            p = gr.Slider(0, 1, value=0.25, step=0.01, label="layer-ratio: p")
            k = gr.Slider(-3, 3, value=0, step=0.05, label="layer-std: k (below mean + k std of log Fisher)")
            bits = gr.Slider(4, 32, value=6, step=0.1, label="budget / random: average bits per weight")
            protect = gr.Checkbox(False, label="protect the middle block")
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="size-readout")
            table = gr.Dataframe(headers=["dtype", "tensors", "params", "bytes"], interactive=False)
            pmap = gr.Plot()
            with gr.Row():
                export_btn = gr.Button("Export model + plan")
                files = gr.File(label="downloads", file_count="multiple", interactive=False)
            upload = gr.File(label="load a plan (.json) or quantized model (.safetensors)",
                             file_types=[".json", ".safetensors"], type="filepath")
    controls = [strategy, target, statistic, log_thr, log_enc, log_mid, log_dec, p, k, bits, protect]

    def on_change(*vals):
        cur = policy_from_controls(*vals)
        return (cur, *readout(state, cur))
    for c in controls:
        c.change(guard(on_change), controls, [current, summary, table, pmap], trigger_mode="always_last",
                 concurrency_id="readout", concurrency_limit=4, show_progress="hidden", api_visibility="undocumented")
    # One named endpoint for the API: the same computation as the live readout.
    readout_btn = gr.Button("refresh readout", visible=False)
    readout_btn.click(guard(on_change), controls, [current, summary, table, pmap], api_name="quantize_readout",
                      concurrency_id="readout", concurrency_limit=4)
    export_btn.click(guard(lambda cur: export(state, cur)), current, files, api_name="export",
                     concurrency_id="heavy", concurrency_limit=1)
    upload.upload(guard(lambda f: (lambda cur: (cur, *readout(state, cur)))(load_upload(state, f))), upload,
                  [current, summary, table, pmap], api_name="load_plan", concurrency_id="readout")
    return controls, on_change, [current, summary, table, pmap]
