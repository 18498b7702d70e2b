import copy

import pytest
import torch

from lafq.policy import Plan
from lafq.precision import fallback
from lafq.int8 import use_int8_kernels
from lafq.quantize import COMPUTE_MODES, quantize, save_quantized


def _plan(model, precision):
    return Plan({n: fallback(tuple(p.shape), precision) for n, p in model.named_parameters()})


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 1, 28, 28, generator=g), torch.tensor([5, 500, 999]), torch.tensor([1, 7, 10])


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_int8_kernels_replace_linears_keep_pointwise_and_narrow_convs_and_stay_close(tiny_model, precision):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    plan = _plan(tiny_model, precision)
    ref = quantize(copy.deepcopy(tiny_model), plan)
    fast = quantize(copy.deepcopy(tiny_model), plan, compute="int8-dynamic")
    assert isinstance(fast.embed.time_mlp[0], DynamicLinear)
    assert isinstance(fast.down1.res[0].emb_proj, DynamicLinear)
    assert type(fast.down3.attn.qkv) is torch.nn.Conv2d  # 1x1 convs: int8 measured slower than their FP32 GEMM
    assert type(fast.down1.res[0].conv1) is torch.nn.Conv2d  # 8 channels, under the rule: the dequantize path
    with torch.inference_mode():
        a, b = ref(*_inputs()), fast(*_inputs())
    assert a.shape == b.shape and not torch.equal(a, b)  # activations are quantized too
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_default_compute_mode_is_untouched_and_unknown_modes_are_refused(tiny_model):
    assert COMPUTE_MODES[0] == "dequantize"
    q = quantize(copy.deepcopy(tiny_model), _plan(tiny_model, "int8"))
    assert isinstance(q.embed.time_mlp[0], torch.nn.Linear) and not hasattr(q, "lafq_compute")
    with pytest.raises(ValueError, match="compute mode"):
        quantize(copy.deepcopy(tiny_model), _plan(tiny_model, "int8"), compute="int3")


def test_a_model_on_int8_kernels_cannot_be_saved_but_a_loaded_one_can_switch(tiny_model, tmp_path):
    from lafq.pipeline import load_denoiser

    fast = quantize(copy.deepcopy(tiny_model), _plan(tiny_model, "int8"), compute="int8-dynamic")
    with pytest.raises(ValueError, match="default compute mode"):
        save_quantized(tmp_path / "q.safetensors", fast)
    save_quantized(tmp_path / "q.safetensors", quantize(copy.deepcopy(tiny_model), _plan(tiny_model, "int8")))
    loaded = use_int8_kernels(load_denoiser(tmp_path / "q.safetensors")[0])
    with torch.inference_mode():
        assert torch.equal(loaded(*_inputs()), fast(*_inputs()))
    with pytest.raises(ValueError, match="quantize it first"):
        use_int8_kernels(copy.deepcopy(tiny_model))


@pytest.mark.skipif(not __import__("lafq.int8").int8.ONEDNN_CONV, reason="this torch has no oneDNN int8 conv")
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_wide_3x3_convs_run_onednn_int8_with_their_stored_codes_and_stay_close_to_the_dequantized_math(precision):
    from lafq.int8 import INT8_CONV_MIN_CHANNELS, _Int8Conv2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(INT8_CONV_MIN_CHANNELS, 64, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(64, 8, 3, padding=1, stride=2), torch.nn.SiLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 64, 1),
                                torch.nn.Conv2d(64, 64, 1)).eval()
    plan = Plan({n: fallback(tuple(p.shape), precision) for n, p in model.named_parameters() if p.dim() > 1})
    ref = quantize(copy.deepcopy(model), plan)
    fast = quantize(copy.deepcopy(model), plan, compute="int8-dynamic")
    assert isinstance(fast[0], _Int8Conv2d) and isinstance(fast[2], _Int8Conv2d)
    assert type(fast[4]) is torch.nn.Conv2d  # narrower than the rule: the dequantize path
    assert type(fast[6]) is torch.nn.Conv2d  # a wide 1x1 conv too: int8 measured slower than its FP32 GEMM
    x = torch.randn(4, INT8_CONV_MIN_CHANNELS, 14, 14)
    with torch.inference_mode():
        a, b = ref(x), fast(x)
    assert a.shape == b.shape and not torch.equal(a, b)  # 8-bit activations
    assert (a - b).abs().mean() < 0.03 * a.abs().mean()  # about 1% per conv, measured


@pytest.mark.skipif(not __import__("lafq.int8").int8.ONEDNN_CONV, reason="no VNNI oneDNN int8 conv here")
def test_a_model_on_onednn_int8_convs_copies_with_the_same_outputs_and_refuses_a_gpu():
    from lafq.int8 import _Int8Conv2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1)).eval()
    fast = quantize(model, Plan({"0.weight": "int8"}), compute="int8-dynamic")
    twin = copy.deepcopy(fast)  # the packed oneDNN weight is opaque: the copy re-packs the stored codes
    assert isinstance(twin[0], _Int8Conv2d) and twin[0].packed is not fast[0].packed
    x = torch.randn(2, 64, 7, 7)
    with torch.inference_mode():
        assert torch.equal(twin(x), fast(x))
    with pytest.raises(ValueError, match="keep the model on the CPU"):
        fast.to("cuda")
