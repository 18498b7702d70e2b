"""Static W8A8: activation ranges calibrated per timestep bin, stored, reloaded bit-identically and used by the int8
convolutions (the bin follows the timestep the model is called with); named layers can keep float activations."""
import copy
from dataclasses import replace

import pytest
import torch

from lafq.int8 import ONEDNN_CONV, ActivationRanges, calibrate_activations, int8_layers, use_w8a8
from lafq.policy import Plan
from lafq.precision import fallback
from lafq.quantize import quantize

pytestmark = pytest.mark.skipif(not ONEDNN_CONV, reason="oneDNN int8 convolutions need a CPU with VNNI")


@pytest.fixture(scope="module")
def quantized():
    from lafq.models import load

    den = load()  # the shipped U-Net: its convs are wide enough for int8 activations
    plan = Plan({n: fallback(tuple(p.shape), "int8") for n, p in den.module.named_parameters()})
    q = quantize(copy.deepcopy(den.module), plan)
    ranges = calibrate_activations(replace(den, module=q), n=4, steps=5, bins=4)
    return den, q, ranges


def _out(model, t):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 28, 28, generator=g), torch.tensor([3, 7])
    with torch.inference_mode():
        return model(x, torch.full((2,), t), y)


def test_calibrated_ranges_cover_every_int8_conv_per_bin_and_reload_bit_identically(quantized, tmp_path):
    _, q, ranges = quantized
    convs = [k for k, kind in int8_layers(q).items() if kind == "conv"]
    assert convs and set(convs) <= set(ranges.ranges) and ranges.bins == 4
    assert all(r.shape == (4, 2) and (r[:, 0] <= 0).all() and (r[:, 1] >= 0).all() for r in ranges.ranges.values())
    assert max(ranges.drift().values()) > 1.2  # ranges do drift over the steps: one static range would be off
    ranges.save(tmp_path / "acts.safetensors")
    back = ActivationRanges.load(tmp_path / "acts.safetensors")
    assert back.edges == ranges.edges and back.meta == ranges.meta and back.ranges.keys() == ranges.ranges.keys()
    assert all(torch.equal(back.ranges[k], v) for k, v in ranges.ranges.items())
    assert torch.equal(_out(use_w8a8(copy.deepcopy(q), back), 999), _out(use_w8a8(copy.deepcopy(q), ranges), 999))


def test_each_timestep_uses_its_own_bins_ranges_and_removing_them_changes_the_output(quantized):
    _, q, ranges = quantized
    w = use_w8a8(copy.deepcopy(q), ranges)
    assert type(w.down2.res[0].conv1).__name__ == "_StaticInt8Conv2d" and w.lafq_compute == "w8a8"
    wider = {k: v.clone() for k, v in ranges.ranges.items()}
    for v in wider.values():
        v[0] *= 10  # bin 0 (t < 250) only
    w2 = use_w8a8(copy.deepcopy(q), ActivationRanges(ranges.edges, wider))
    assert not torch.equal(_out(w, 10), _out(w2, 10))  # bin 0's ranges are what t = 10 uses ...
    assert torch.equal(_out(w, 999), _out(w2, 999))  # ... and not what t = 999 uses
    no_ranges = use_w8a8(copy.deepcopy(q), ActivationRanges(ranges.edges, {}))  # removed: float activations
    assert not torch.equal(_out(no_ranges, 999), _out(w, 999))
    assert set(no_ranges.lafq_activations.values()) >= {"float"}
    ref = _out(q, 999)
    assert (_out(w, 999) - ref).abs().max() < 0.1 * ref.abs().max()  # 8-bit activations stay close


def test_named_layers_keep_float_activations_and_unknown_names_are_refused(quantized):
    _, q, ranges = quantized
    w = use_w8a8(copy.deepcopy(q), ranges, keep_float=("head.2", "down2.res.0.conv1"))
    assert type(w.down2.res[0].conv1) is torch.nn.Conv2d and type(w.head[2]) is torch.nn.Conv2d
    assert w.lafq_activations["head.2"] == "float" and w.lafq_activations["down3.res.0.conv1"] == "int8"
    with pytest.raises(ValueError, match="without int8 activations here: stem"):
        use_w8a8(copy.deepcopy(q), ranges, keep_float=("stem",))
    with pytest.raises(ValueError, match="needs a quantized model"):
        use_w8a8(copy.deepcopy(quantized[0].module), ranges)


def test_a_w8a8_model_samples_close_to_fp32_and_a_deep_copy_follows_its_own_timesteps(quantized):
    from lafq.pipeline import SampleSpec, generate

    den, q, ranges = quantized
    w = use_w8a8(copy.deepcopy(q), ranges)
    spec = SampleSpec(n=4, steps=5, seed=1)
    ref, got = generate(den.module, spec)[0], generate(w, spec)[0]
    assert (got.float() - ref.float()).abs().mean() / 255 < 0.05
    c = copy.deepcopy(w)
    assert torch.equal(_out(c, 10), _out(w, 10)) and torch.equal(_out(c, 999), _out(w, 999))


def test_a_mixed_timestep_batch_and_ranges_of_another_plan_are_refused_in_one_line(quantized):
    _, q, ranges = quantized
    w = use_w8a8(copy.deepcopy(q), ranges)
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 7])
    with pytest.raises(ValueError, match="one timestep per batch"), torch.inference_mode():
        w(x, torch.tensor([10, 900]), y)
    other = quantize(copy.deepcopy(quantized[0].module),
                     Plan({n: fallback(tuple(p.shape), "int4") for n, p in quantized[0].module.named_parameters()}))
    with pytest.raises(ValueError, match="calibrated on another plan"):
        use_w8a8(other, ranges)


def test_the_cli_calibrates_a_quantized_file_and_samples_it_in_w8a8_and_the_fid_cache_keeps_modes_apart(tmp_path,
                                                                                                       capsys):
    import json
    from types import SimpleNamespace

    from lafq.cli import build_parser, main
    from lafq.cli_quant import load_model_arg
    from lafq.pipeline import SampleSpec, seed_result_key

    q, acts, f16 = tmp_path / "int8.safetensors", tmp_path / "acts.safetensors", tmp_path / "fp16.safetensors"
    assert main(["quantize", "--strategy", "uniform", "--target", "int8", "--out", str(q)]) == 0
    assert main(["quantize", "--strategy", "uniform", "--target", "fp16", "--out", str(f16)]) == 0
    assert main(["calibrate", "--weights", str(q), "--n", "2", "--steps", "3", "--bins", "3", "--out", str(acts),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bins"] == 3 and res["layers"] == len(ActivationRanges.load(acts).ranges) > 0
    grid = tmp_path / "w8a8.png"
    assert main(["sample", "--weights", str(q), "--compute", "w8a8", "--activations", str(acts), "--keep-float",
                 "down2.res.0.conv1", "--n", "2", "--steps", "3", "--out", str(grid)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    # Options that do not go together, or a model that is not quantized: one line, exit 2.
    for bad, why in [(["--weights", str(q), "--activations", str(acts)], "add it"),
                     (["--weights", str(q), "--compute", "w8a8"], "needs --activations"),
                     (["--compute", "int8-dynamic"], "give a quantized model"),
                     (["--weights", str(f16), "--compute", "int8-dynamic"], "no layer of this plan"),
                     (["--weights", str(q), "--compute", "int8-dynamic", "--device", "cuda"], "CPU kernels"),
                     (["--weights", str(q), "--compute", "w8a8", "--activations", str(q)], "activation-ranges")]:
        capsys.readouterr()
        assert main(["sample", *bad, "--n", "1", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert main(["fid", "--weights", str(q), "--compute", "int8-dynamic", "--compile"]) == 2
    assert "does not go with --compile" in capsys.readouterr().err

    def key(*extra):
        args = build_parser().parse_args(["fid", "--weights", str(q), *extra])
        backend = SimpleNamespace(name="classifier")
        return seed_result_key(load_model_arg(args).den, SampleSpec(n=2, steps=2), backend, None, "mnist-test")
    plain, dyn, w8 = key(), key("--compute", "int8-dynamic"), key("--compute", "w8a8", "--activations", str(acts))
    assert len({plain, dyn, w8}) == 3  # a cached dequantize FID is never reused for integer kernels
    assert w8 != key("--compute", "w8a8", "--activations", str(acts), "--keep-float", "down2.res.0.conv1")
