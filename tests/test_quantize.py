import copy

import pytest
import torch

from lafq.checkpoint import CheckpointError
from lafq.diffusion import linear_schedule, sample
from lafq.pipeline import load_denoiser
from lafq.policy import Plan, param_shapes
from lafq.precision import fallback
from lafq.quantize import quantize, save_quantized, size_report


def _plan(model, precision):
    return Plan({n: fallback(tuple(p.shape), precision) for n, p in model.named_parameters()})


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "int4", "int4-g64", "int4-g32"])
def test_saved_file_is_smaller_and_reloads_bit_identically(tiny_model, tiny_ckpt, tmp_path, precision):
    q = quantize(copy.deepcopy(tiny_model), _plan(tiny_model, precision))
    path = tmp_path / f"{precision}.safetensors"
    size = save_quantized(path, q)
    # A tiny model's JSON header weighs more than a real one's, hence the slack over 0.5 / 0.25.
    assert size < tiny_ckpt.stat().st_size * (0.6 if precision in ("fp16", "bf16") else 0.4)
    back, meta = load_denoiser(path)
    assert meta["kind"] == "quantized"
    s = linear_schedule()
    a = sample(q, s, 3, steps=4, seed=5, labels=[1, 2, 3])
    b = sample(back, s, 3, steps=4, seed=5, labels=[1, 2, 3])
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(tiny_model, s, 3, steps=4, seed=5, labels=[1, 2, 3]))  # really quantized


def test_memory_holds_the_stored_form(tiny_model):
    q = quantize(copy.deepcopy(tiny_model), _plan(tiny_model, "int4"))
    assert not any(p.dim() > 1 for p in q.parameters())  # every matrix left the parameter list
    assert q.down1.res[0].conv1.weight_q.dtype == torch.uint8
    assert q.down1.res[0].conv1.weight_scale.dtype == torch.float32


def test_size_report_counts_dtypes_and_scales(tiny_model):
    shapes = param_shapes(tiny_model)
    numel = sum(p.numel() for p in tiny_model.parameters())
    r = size_report(_plan(tiny_model, "fp16"), shapes)
    assert r.total_bytes == 2 * numel and r.reduction_pct == pytest.approx(50)
    assert r.tensors_by_dtype["fp16"] == len(shapes)
    r4 = size_report(_plan(tiny_model, "int4"), shapes)
    mats = [s for s in shapes.values() if len(s) > 1]
    assert r4.scale_bytes == 4 * sum(s[0] for s in mats)
    assert r4.tensors_by_dtype["int4"] == len(mats) and r4.tensors_by_dtype["fp16"] == len(shapes) - len(mats)


def test_quantizing_twice_and_bad_plans_are_refused(tiny_model):
    q = quantize(copy.deepcopy(tiny_model), _plan(tiny_model, "fp16"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q, _plan(tiny_model, "fp16"))
    with pytest.raises(ValueError, match="lacks"):
        quantize(copy.deepcopy(tiny_model), Plan({"nope.weight": "fp16"}))
    with pytest.raises(ValueError, match="integer formats on vectors"):
        quantize(copy.deepcopy(tiny_model), Plan({"stem.bias": "int8"}))


def test_tampered_quantized_file_is_refused(tiny_model, tmp_path):
    from lafq.checkpoint import load_file, save_file
    path = tmp_path / "q.safetensors"
    save_quantized(path, quantize(copy.deepcopy(tiny_model), _plan(tiny_model, "int8")))
    tensors, meta = load_file(path)
    tensors.pop("stem.weight.scale")
    meta.pop("format")
    save_file(path, tensors, meta)
    with pytest.raises(CheckpointError, match="missing tensor 'stem.weight.scale'"):
        load_denoiser(path)


def test_hold_dequantizes_once_per_sampling_call_with_identical_outputs(tiny_model, monkeypatch):
    import lafq.quantize as qz
    from lafq.quantize import hold_dequantized

    q = quantize(copy.deepcopy(tiny_model), _plan(tiny_model, "int4"))
    s = linear_schedule()
    per_step = sample(q, s, 2, steps=3, seed=1, labels=[4, 5])
    calls = []
    real_load = qz.load
    monkeypatch.setattr(qz, "load", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    with hold_dequantized(q):
        held = sample(q, s, 2, steps=3, seed=1, labels=[4, 5])
        n_held = len(calls)
        with hold_dequantized(q):  # nested / concurrent holders share the weights
            sample(q, s, 2, steps=3, seed=1, labels=[4, 5])
        assert len(calls) == n_held  # the inner block ended but the outer still holds
    assert torch.equal(held, per_step)
    assert n_held == len(q.lafq_stored)  # once per quantized tensor, not once per step
    sample(q, s, 2, steps=3, seed=1, labels=[4, 5])
    assert len(calls) == n_held + 3 * len(q.lafq_stored)  # outside a block: every forward again
    copy.deepcopy(q)  # the hold counter (which owns a lock) must not break copying


def test_low_precision_compute_runs_a_quantized_model(tiny_model):
    """.to(bfloat16) on the CPU (fp16 on a GPU): the time embedding must follow the input's dtype, and the int8
    codes stay int8."""
    q = quantize(copy.deepcopy(tiny_model), _plan(tiny_model, "int8")).to(torch.bfloat16)
    assert q.lafq_stored["stem.weight"].data.dtype == torch.int8 and q.dtype == torch.bfloat16
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        out = q(x.to(torch.bfloat16), t, y)
        ref = tiny_model(x, t, y)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=0.1)


def test_quantizing_does_not_import_the_fisher_machinery():
    import subprocess
    import sys

    code = "import sys, lafq.quantize; print(sorted(m for m in sys.modules if m.startswith('lafq')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/tests/", 1)[0]).stdout
    assert "lafq.fisher" not in out and "lafq.policy" not in out and "lafq.plan" in out
