"""Speed work must not change what FP32 sampling computes: the in-place path moves no bit, and the
CPU fast paths (lafq.model.FAST_INFERENCE: a transposed conv for upsampling + 3x3 conv, the chunked 28x28
tail) move only float rounding: a pixel by 1/255 here and there (both image hashes are pinned), orders of
magnitude below any plan's effect in the report."""
import copy
import hashlib

import pytest
import torch

import lafq.model as lafq_model

from lafq.pipeline import SampleSpec, generate, load_denoiser

# sha256 of the uint8 images of generate(shipped checkpoint, SampleSpec(n=16, steps=10, seed=0)), recorded
# before the in-place inference path existed (2-core Intel Xeon VM, AVX-512, torch 2.14.1; 1 and 2 threads agree).
# oneDNN may pick other kernels on another CPU, so there a mismatch means "re-record", not a bug; the
# test below, which compares the two code paths on any machine, is the portable check.
SHIPPED_IMAGES_SHA256 = "0a4fceb47b2c8232221b5f2f18ce83490d1f62e09206c0332420bdfbe045c6ea"
# The same images with lafq.model's CPU fast paths (the default): the transposed conv that replaces upsampling
# and a 3x3 conv sums in another order, which moves a few pixels by 1/255 (1 of 156,800 at N = 200, DDIM-50,
# guidance 1.5).
SHIPPED_IMAGES_FAST_SHA256 = "b3a132401beb5f5a61e6cae96420a5847d3f76e48af519dbb68d59048162d9c3"


def _inputs(n=6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 11, (n,), generator=g))


@pytest.fixture
def plain_paths(monkeypatch):
    monkeypatch.setattr(lafq_model, "FAST_INFERENCE", False)


def test_inference_path_is_bit_identical_to_the_autograd_path(tiny_model, plain_paths):
    x, t, y = _inputs()
    with torch.enable_grad():
        ref = tiny_model(x, t, y).detach()
    with torch.inference_mode():
        assert torch.equal(tiny_model(x, t, y), ref)
    with torch.no_grad():
        assert torch.equal(tiny_model(x, t, y), ref)


def test_shipped_model_inference_path_is_bit_identical_to_the_autograd_path(plain_paths):
    m, _ = load_denoiser()
    x, t, y = _inputs(8)
    with torch.enable_grad():
        ref = m(x, t, y).detach()
    with torch.inference_mode():
        assert torch.equal(m(x, t, y), ref)


def _machine() -> tuple[str, bool, str]:
    """(CPU model, AVX-512 present, torch release): what decides which oneDNN kernels run."""
    from pathlib import Path

    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return model, " avx512f" in flags, torch.__version__.split("+")[0]


RECORDED_ON = ("Intel(R) Xeon(R) Processor", True, "2.14.1")


@pytest.mark.parametrize("fast", [False, True], ids=["plain paths", "cpu fast paths"])
def test_shipped_model_generates_the_recorded_images(fast, monkeypatch):
    if _machine() != RECORDED_ON:
        pytest.skip(f"images recorded on {RECORDED_ON}, this machine is {_machine()}: re-record the hash here")
    monkeypatch.setattr(lafq_model, "FAST_INFERENCE", fast)
    m, _ = load_denoiser()
    images, _ = generate(m, SampleSpec(n=16, steps=10, seed=0))
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    assert digest == (SHIPPED_IMAGES_FAST_SHA256 if fast else SHIPPED_IMAGES_SHA256)


def test_autograd_still_flows_through_every_block(tiny_model):
    x, t, y = _inputs(2)
    tiny_model(x, t, y).square().mean().backward()
    assert all(p.grad is not None for p in tiny_model.parameters() if p.requires_grad)


def _forward(model, x, t, y, fast: bool):
    lafq_model.FAST_INFERENCE = fast
    try:
        with torch.inference_mode():
            return model(x, t, y)
    finally:
        lafq_model.FAST_INFERENCE = True


def _float64_plain(model, x, t, y):
    """The plain forward in float64: the function both float32 paths round."""
    return _forward(copy.deepcopy(model).double(), x.double(), t, y, False)


def assert_rounding_close(fast, plain, ref):
    """`fast` and `plain` are float32 roundings of one function, `ref` is it in float64. The fast path does fewer
    multiply-adds per output than the plain one (16 vs 36 per upsampled pixel, the same convolutions elsewhere),
    so its error is at most a few times the plain path's error measured on this machine, whatever its kernels;
    the 2^-24 term is one float32 rounding of the output."""
    err_plain = (plain.double() - ref).abs().max()
    err_fast = (fast.double() - ref).abs().max()
    assert err_plain <= 2.0 ** -10 * ref.abs().max(), err_plain  # `ref` is this function (another is off by O(1))
    assert err_fast <= 4 * err_plain + 2.0 ** -24 * ref.abs().max(), (err_fast, err_plain)


@pytest.fixture
def chunked(monkeypatch):
    """A chunk size that makes the tiny model's 28x28 tail (6 x 16 channels x 28 x 28 floats) split in three."""
    monkeypatch.setattr(lafq_model, "CHUNK_BYTES", 2 * 16 * 28 * 28 * 4)


def _counting(monkeypatch, obj, name):
    calls = []
    inner = getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a, **k: calls.append(1) or inner(*a, **k))
    return calls


def test_fast_paths_equal_the_plain_forward_to_float_rounding(tiny_model, chunked, monkeypatch):
    x, t, y = _inputs()
    ref = _float64_plain(tiny_model, x, t, y)
    upsampled = _counting(monkeypatch, lafq_model, "_upsample_conv2x")
    tails = _counting(monkeypatch, tiny_model.up1, "forward")
    fast = _forward(tiny_model, x, t, y, True)
    assert len(upsampled) == 2 and len(tails) == 3  # up3 and up2 upsampled; the 28x28 tail in three chunks
    plain = _forward(tiny_model, x, t, y, False)
    assert len(upsampled) == 2 and len(tails) == 4
    assert_rounding_close(fast, plain, ref)


def test_the_chunked_tail_broadcasts_a_batch_one_embedding_and_takes_an_empty_batch(chunked):
    from lafq.model import UNet
    from tests.conftest import TINY

    torch.manual_seed(0)
    model = UNet(type(TINY)(**{**TINY.to_dict(), "num_classes": 0})).eval()  # no class embedding
    x = torch.randn(6, 1, 28, 28)
    t = torch.tensor([500])  # one timestep for the whole batch: a batch-1 embedding
    fast = _forward(model, x, t, None, True)
    assert fast.shape == x.shape
    assert_rounding_close(fast, _forward(model, x, t, None, False), _float64_plain(model, x, t, None))
    assert _forward(model, x[:0], t[:0], None, True).shape == (0, 1, 28, 28)


def test_shipped_model_fast_paths_equal_the_plain_forward_at_the_sampling_batch():
    m, _ = load_denoiser()
    x, t, y = _inputs(128)  # guided sampling of 64 images: the tail runs in two chunks
    assert_rounding_close(_forward(m, x, t, y, True), _forward(m, x, t, y, False), _float64_plain(m, x, t, y))


def test_upsample_conv_equals_upsampling_then_the_conv_for_both_layouts():
    torch.manual_seed(0)
    resample = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="nearest"), torch.nn.Conv2d(5, 3, 3, padding=1))
    x = torch.randn(2, 5, 7, 6)
    conv = resample[1]
    with torch.inference_mode():
        ref = copy.deepcopy(resample).double()(x.double())
        # Each output sums 9*5 products and a bias (the plain conv) or 4*5 products of taps that are sums of up to
        # 4 weights (the fast one): each within (45+1)*2^-24 of the sum of |terms| (Higham's bound, 46 roundings),
        # the fast one within (24+3)*2^-24; 80 covers both, whatever order a CPU's kernels sum in.
        mag = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x.abs().double(), scale_factor=2),
                                         conv.weight.abs().double(), conv.bias.abs().double(), padding=1)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = lafq_model._upsample_conv2x(inp, conv.weight, conv.bias)
            assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last) == (inp is not x)
            assert ((out.double() - ref).abs() <= 80 * 2.0 ** -24 * mag).all()


def test_a_hooked_layer_sees_the_whole_batch_once(tiny_model, chunked):
    seen = []
    handle = tiny_model.up1.register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    try:
        x, t, y = _inputs()
        out = _forward(tiny_model, x, t, y, True)
    finally:
        handle.remove()
    assert seen == [6]  # a hook (lafq.inside's activations) turns the chunked tail off
    assert_rounding_close(out, _forward(tiny_model, x, t, y, False), _float64_plain(tiny_model, x, t, y))


def test_a_quantized_model_takes_the_fast_paths_with_its_own_weights(tiny_model, chunked):
    from lafq.plan import Plan, param_shapes
    from lafq.quantize import hold_dequantized, quantize

    q = quantize(tiny_model, Plan({n: "int4" if len(s) > 1 else "fp32" for n, s in param_shapes(tiny_model).items()}))
    x, t, y = _inputs()
    plain = _forward(q, x, t, y, False)
    # The same function with the weights the plain forward dequantized, as an ordinary model, in float64.
    from lafq.model import UNet

    weights = {f"{name}.{attr}": getattr(m, attr).detach().clone() for name, m in q.named_modules()
               for attr in ("weight", "bias") if isinstance(getattr(m, attr, None), torch.Tensor)}
    dequantized = UNet(q.cfg).eval()
    dequantized.load_state_dict(weights, strict=False)
    ref = _float64_plain(dequantized, x, t, y)
    for level in (q.up3, q.up2):  # stale weights: only the dequantize hook, run by upsample_conv, restores them
        level.resample[1].weight = torch.zeros_like(level.resample[1].weight)
    assert_rounding_close(_forward(q, x, t, y, True), plain, ref)
    with hold_dequantized(q):  # as sampling runs it: weights dequantized once, reused by every chunk
        assert_rounding_close(_forward(q, x, t, y, True), plain, ref)


def test_int8_dynamic_chunks_get_their_own_activation_scales_within_int8_error(tiny_model, chunked):
    """Its activation scales span the tensor, so the chunked tail moves outputs by int8 error, as a different
    batch size would; the fidelity in docs/benchmark-runs.md is measured this way."""
    from lafq.plan import Plan, param_shapes
    from lafq.quantize import quantize

    q = quantize(tiny_model, Plan({n: "int8" if len(s) > 1 else "fp32" for n, s in param_shapes(tiny_model).items()}),
                  compute="int8-dynamic")
    x, t, y = _inputs()
    fast, plain = _forward(q, x, t, y, True), _forward(q, x, t, y, False)
    assert not torch.allclose(fast, plain, rtol=1e-5, atol=1e-5)
    assert (fast - plain).abs().max() < 0.05 * plain.abs().max()
