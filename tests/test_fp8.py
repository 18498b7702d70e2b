"""FP8 (e4m3, one fp32 scale per output channel) weight storage, added through the format registry alone:
its bytes, round trip, files that reload bit for bit, and its torchao export applied with the real torchao."""
import copy
import warnings

import pytest
import torch

from lafq.plan import param_shapes
from lafq.policy import Plan
from lafq.precision import FORMATS, PRECISIONS, fallback, roundtrip, store, tensor_bytes


def test_fp8_is_a_registered_format_with_one_byte_per_weight_and_fp32_channel_scales():
    assert "fp8" in PRECISIONS and FORMATS["fp8"].dtype == torch.float8_e4m3fn
    assert tensor_bytes((64, 32, 3, 3), "fp8") == 64 * 32 * 9 + 4 * 64
    assert fallback((7,), "fp8") == "fp16"  # vectors take float formats


def test_fp8_round_trip_is_within_e4m3_relative_precision_of_each_channel_scale():
    """e4m3 keeps 3 mantissa bits: a value rounds to within 2^-4 of itself, relative, in the normal range
    (scaled values reach 448, the format's largest; below 2^-6 the subnormal step is 2^-9 of the scale)."""
    torch.manual_seed(0)
    w = torch.randn(16, 40) * torch.logspace(-3, 1, 16)[:, None]
    s = store(w, "fp8")
    scale = w.abs().amax(1) / 448
    assert torch.allclose(s.scale, scale)
    err = (roundtrip(w, "fp8") - w).abs()
    assert (err <= w.abs() * 2 ** -4 + scale[:, None] * 2 ** -9 + 1e-12).all()
    assert s.data.dtype == torch.float8_e4m3fn and s.data.float().abs().max() <= 448


def test_an_fp8_model_stores_its_bytes_and_reloads_bit_identically(tiny_model, tmp_path):
    from lafq.quantize import load_quantized, quantize, quantized_tensors, save_quantized, size_report

    plan = Plan({n: fallback(s, "fp8") for n, s in param_shapes(tiny_model).items()})
    q = quantize(copy.deepcopy(tiny_model), plan)
    stored = sum(t.numel() * t.element_size() for t in quantized_tensors(q).values())
    assert stored == size_report(plan, param_shapes(tiny_model)).total_bytes  # what the plan says is what is held
    save_quantized(tmp_path / "q.safetensors", q)
    back, _ = load_quantized(tmp_path / "q.safetensors")
    a, b = quantized_tensors(q), quantized_tensors(back)
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) if a[k].dtype == torch.float8_e4m3fn
               else torch.equal(a[k], b[k]) for k in a)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(back(x, t, y), q(x, t, y))
        assert (q(x, t, y) - tiny_model(x, t, y)).abs().max() < 0.5


def test_the_fp8_torchao_export_applies_and_stores_the_codes_lafq_stores():
    pytest.importorskip("torchao", reason="torchao is optional (requirements-export.txt)")
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    from lafq.export import export_plan, load_export
    from tests.diffusers_tiny import export_unet2d

    model = export_unet2d()
    plan = Plan({n: fallback(s, "fp8") for n, s in param_shapes(model).items()})
    exp = export_plan(plan, model, "torchao")
    assert exp.converted and set(exp.converted.values()) == {"fp8"}
    assert all(isinstance(c, Float8WeightOnlyConfig) for c in exp.config.fqn_to_config.values())
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        exp.save(Path(d) / "ao.json")
        cfg = load_export(Path(d) / "ao.json")
    q = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(q, cfg, filter_fn=None)
    for name in exp.converted:  # torchao holds the same e4m3 codes and per-row scales as lafq
        w = q.get_submodule(name).weight
        mine = store(model.get_submodule(name).weight, "fp8")
        assert torch.equal(w.qdata.view(torch.uint8), mine.data.view(torch.uint8)), name
        assert torch.allclose(w.scale.flatten(), mine.scale), name
    quanto = export_plan(plan, model, "quanto")
    assert [c["weights"] for c in quanto.config] == ["qfloat8"]
