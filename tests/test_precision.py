import pytest
import torch

from lafq.precision import (data_bytes, fallback, load, pack_int4, quantize_int, roundtrip, scale_bytes, store,
                            tensor_bytes, unpack_int4)


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_int4_packing_round_trips_every_value(n):
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(n)[: 16 * n - (n % 2)].reshape(-1, 1)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (q.numel() + 1) // 2
    assert torch.equal(unpack_int4(packed, q.shape), q)


@pytest.mark.parametrize("precision, qmax", [("int8", 127), ("int4", 7)])
def test_int_round_trip_error_is_at_most_half_a_step(precision, qmax):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.logspace(-3, 1, 16)[:, None, None, None]
    w[3] = 0  # an all-zero channel must survive
    s = store(w, precision)
    back = load(s)
    scale = w.flatten(1).abs().amax(1) / qmax
    err = (back - w).flatten(1).abs().amax(1)
    # Half a step, plus float32 rounding of w/s (≤ u*qmax steps) and of q*s (≤ u*qmax steps), u = 2^-24: 2^-22
    # leaves a factor 2, on any CPU.
    assert torch.all(err <= scale * (0.5 + 2.0 ** -22 * qmax))
    assert torch.equal(back[3], torch.zeros_like(back[3]))
    q, _ = quantize_int(w, precision)
    assert q.abs().max() == qmax  # the channel maximum maps to the top code


def test_float_formats_are_casts():
    w = torch.randn(5, 4)
    assert torch.equal(roundtrip(w, "fp16"), w.half().float())
    assert torch.equal(roundtrip(w, "bf16"), w.bfloat16().float())
    assert torch.equal(roundtrip(w, "fp32"), w)


def test_sizes_follow_numel_times_element_size():
    shape = (32, 16, 3, 3)  # 4608 values
    assert data_bytes(shape, "fp32") == 4 * 4608
    assert data_bytes(shape, "fp16") == data_bytes(shape, "bf16") == 2 * 4608
    assert data_bytes(shape, "int8") == 4608 and data_bytes(shape, "int4") == 2304
    assert scale_bytes(shape, "int4") == 32 * 4 and scale_bytes(shape, "fp16") == 0
    assert data_bytes((3, 1), "int4") == 2  # odd counts round up to whole bytes
    assert tensor_bytes((3, 1), "int4") == 2 + 3 * 4


def test_vectors_take_float_formats_only():
    assert fallback((10,), "int4") == "fp16" and fallback((10, 3), "int4") == "int4"
    with pytest.raises(ValueError, match="output-channel"):
        store(torch.zeros(10), "int8")
    with pytest.raises(ValueError, match="unknown precision"):
        store(torch.zeros(10, 2), "int2")


@pytest.mark.parametrize("precision, group", [("int4-g32", 32), ("int4-g64", 64)])
def test_group_wise_int4_error_is_at_most_half_a_step_of_each_group(precision, group):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 10, 3, 3, generator=g) * torch.logspace(-2, 1, 90).reshape(1, 10, 3, 3)  # 90 = 2 full groups of 32 + 26
    w[2] = 0
    s = store(w, precision)
    assert s.scale.dtype == torch.float16 and tuple(s.scale.shape) == (6, -(-90 // group))
    back = load(s)
    err = (back - w).flatten(1).abs()
    for k in range(0, 90, group):
        step = s.scale[:, k // group].float()
        assert torch.all(err[:, k:k + group] <= step[:, None] * (0.5 + 2.0 ** -22 * 7))  # as above, qmax = 7
    assert torch.equal(back[2], torch.zeros_like(back[2]))
    assert data_bytes(w.shape, precision) == 6 * 90 // 2 and scale_bytes(w.shape, precision) == 6 * (-(-90 // group)) * 2


def test_group_wise_int4_rescues_a_one_channel_tensor():
    """A 1-output-channel conv (the U-Net's head) gets one scale for all its weights per channel;
    groups of 32 give it nine, and much less error for 14 more bytes."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 32, 3, 3, generator=g) * torch.logspace(-2, 0, 32)[None, :, None, None]
    e4 = (roundtrip(w, "int4") - w).pow(2).sum()
    e32 = (roundtrip(w, "int4-g32") - w).pow(2).sum()
    assert e32 < 0.5 * e4
    assert tensor_bytes(w.shape, "int4-g32") - tensor_bytes(w.shape, "int4") == 9 * 2 - 4
