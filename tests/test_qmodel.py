"""Quantized models of any architecture: storage, moves and casts, files that reload bit-identically."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lafq.checkpoint import CheckpointError, load_file
from lafq.policy import Plan
from lafq.precision import fallback
from lafq.quantize import (
    base_class,
    compute_dtype,
    load_quantized,
    quantize,
    quantized_tensors,
    save_quantized,
)

MIXED = ["int8", "int4", "int4-g32", "fp16", "bf16", "fp32", "int4-g64"]


def _mixed_plan(model):
    """Every precision, cycling over the parameters (vectors fall back to fp16)."""
    return Plan({n: fallback(tuple(p.shape), MIXED[i % len(MIXED)]) for i, (n, p) in enumerate(model.named_parameters())})


def _assert_same_storage(a, b):
    ta, tb = quantized_tensors(a), quantized_tensors(b)
    ta.update({k: v for k, v in a.state_dict().items() if k not in ta})
    tb.update({k: v for k, v in b.state_dict().items() if k not in tb})
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def _diffusers_models():
    from tests.diffusers_tiny import (
        tiny_dit,
        tiny_transformer2d,
        tiny_unet2d,
        tiny_unet2d_condition,
    )
    return {"UNet2DModel": tiny_unet2d, "UNet2DConditionModel": tiny_unet2d_condition, "DiT": tiny_dit,
            "Transformer2DModel": tiny_transformer2d}


def _call_kwargs(model, n):
    if "Condition" in type(model).__name__:
        return {"encoder_hidden_states": torch.randn(n, 5, model.config.cross_attention_dim)}
    return {"class_labels": torch.arange(n) % 3}


def _adapted(arch):
    """(FP32 model, model -> its Denoiser with conditioning rows 0 and 1, library the file records)."""
    from lafq.models import capture_conditioning, from_diffusers, from_lafq_unet
    from tests.diffusers_tiny import scheduler

    if arch == "lafq-UNet":
        from lafq.model import UNet
        from tests.conftest import TINY

        torch.manual_seed(0)
        return UNet(TINY).eval(), from_lafq_unet, "lafq"
    model = _diffusers_models()[arch]()
    c = model.config.in_channels
    kw = _call_kwargs(model, 2)
    cond = capture_conditioning(model, lambda: model(torch.randn(2, c, 8, 8), timestep=torch.tensor([3, 7]), **kw))
    return model, (lambda m: from_diffusers(m, scheduler(), conditioning=cond)), "diffusers"


@pytest.mark.parametrize("arch", ["lafq-UNet", "UNet2DModel", "UNet2DConditionModel", "DiT", "Transformer2DModel"])
def test_every_adapters_model_reloads_with_bit_identical_stored_tensors_and_samples_from_the_file(arch, tmp_path):
    model, adapt, library = _adapted(arch)
    q = quantize(copy.deepcopy(model), _mixed_plan(model))
    assert isinstance(q, type(model))  # still the class a pipeline expects
    path = tmp_path / "q.safetensors"
    save_quantized(path, q)
    meta = load_file(path)[1]
    assert meta["model"]["library"] == library and meta["model"]["class"] == type(model).__name__
    back, _ = load_quantized(path)
    # diffusers' from_config builds a DiT-configured Transformer2DModel as its DiTTransformer2DModel
    assert type(back) is type(q) or (arch, base_class(back).__name__) == ("Transformer2DModel", "DiTTransformer2DModel")
    _assert_same_storage(q, back)
    samples = [adapt(m).sample(2, steps=3, seed=4, rows=[0, 1]) for m in (q, back)]
    assert torch.equal(samples[0], samples[1]) and torch.isfinite(samples[0]).all()
    fp32 = adapt(model).sample(2, steps=3, seed=4, rows=[0, 1])
    assert not torch.equal(samples[0], fp32)  # really quantized


def test_moves_and_casts_carry_the_stored_forms_without_recasting_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4))
    plan = Plan({"0.weight": "int8", "0.bias": "bf16", "2.weight": "int4-g32"})
    q = quantize(copy.deepcopy(model), plan)
    x = torch.randn(3, 8)
    before = q(x)
    dtypes = {k: v.dtype for k, v in q.named_buffers()}
    q.double()
    assert {k: v.dtype for k, v in q.named_buffers()} == dtypes  # int8 stays int8, bf16 stays bf16, scales stay
    assert compute_dtype(q) == torch.float64 and q(x.double()).dtype == torch.float64
    assert q[0].weight_q is q[0]._lafq_stored["weight"].data  # the stored form follows the buffer
    q.float()  # float64 and back is lossless for the fp32 parameters left (2.bias)
    assert torch.equal(q(x), before)
    q.half()
    assert {k: v.dtype for k, v in q.named_buffers()} == dtypes
    assert q(x.half()).dtype == torch.float16 and q[2].weight_scale.dtype == torch.float16  # group scales are fp16


def test_a_quantized_diffusers_model_reports_and_runs_in_its_compute_dtype_after_casts():
    model = _diffusers_models()["UNet2DModel"]()
    q = quantize(copy.deepcopy(model), Plan({n: fallback(tuple(p.shape), "int8") for n, p in model.named_parameters()}))
    x, t, kw = torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), _call_kwargs(model, 2)
    before = q(x, t, **kw).sample
    q.to(torch.float64)  # diffusers casts its time embedding to model.dtype: it must say float64 now
    assert q.dtype == torch.float64 and q(x.double(), t, **kw).sample.dtype == torch.float64
    q.to(torch.float32)
    assert q.dtype == torch.float32 and torch.equal(q(x, t, **kw).sample, before)


def test_any_torch_module_with_conv1d_embedding_and_attention_quantizes_and_reloads_into_a_fresh_instance(tmp_path):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 8)
            self.conv = nn.Conv1d(8, 8, 3, padding=1)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, ids):
            h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
            return self.out(self.attn(h, h, h, need_weights=False)[0])

    torch.manual_seed(0)
    model = Mixed().eval()
    plan = Plan({"emb.weight": "int8", "conv.weight": "int4-g32", "attn.in_proj_weight": "int8",
                 "attn.out_proj.weight": "int4", "out.weight": "fp16"})
    q = quantize(copy.deepcopy(model), plan)
    ids = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    ref, got = model(ids), q(ids)
    assert not torch.equal(ref, got) and torch.allclose(ref, got, atol=0.1)
    path = tmp_path / "m.safetensors"
    save_quantized(path, q)
    with pytest.raises(CheckpointError, match="into=model"):
        load_quantized(path)
    back, meta = load_quantized(path, into=Mixed())
    assert meta["model"]["library"] == "torch"
    _assert_same_storage(q, back)
    assert torch.equal(back(ids), got)


GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name, build", [("quantized_unet_v1.safetensors", "unet"),
                                         ("quantized_unet2d.safetensors", "unet2d")])
def test_files_written_by_earlier_versions_load_bit_identically_and_rewrite_to_one_format(name, build, tmp_path):
    """The U-Net's first format (metadata "config") and the diffusers models' format, as earlier versions wrote
    them (every precision, mixed): the stored tensors come back bit for bit, the model computes what a fresh
    quantization of the same weights computes, and a re-save in the one format reloads identically."""
    from lafq.model import UNet
    from lafq.pipeline import load_denoiser
    from tests.conftest import TINY
    from tests.diffusers_tiny import tiny_unet2d

    path = GOLDEN / name
    tensors, meta = load_file(path, kind="quantized")
    back, _ = load_quantized(path)
    got = quantized_tensors(back)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    torch.manual_seed(0)
    fresh = quantize((UNet(TINY) if build == "unet" else tiny_unet2d()).eval(), back.lafq_plan)
    assert all(torch.equal(v, got[k]) for k, v in quantized_tensors(fresh).items())  # what the weights quantize to
    if build == "unet":
        assert "model" not in meta and "config" in meta
        _assert_same_storage(load_denoiser(path)[0], back)  # `sample --checkpoint` reads it the same way
    new = tmp_path / "new.safetensors"
    save_quantized(new, back)
    new_meta = load_file(new, kind="quantized")[1]
    assert new_meta["model"]["library"] == ("lafq" if build == "unet" else "diffusers")
    again, _ = load_quantized(new)
    _assert_same_storage(back, again)
    assert type(again) is type(back) and base_class(again).__name__ == ("UNet" if build == "unet" else "UNet2DModel")


def test_unquantized_models_and_foreign_classes_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tmp_path / "x.safetensors", nn.Linear(2, 2))
    from lafq.checkpoint import save_file
    save_file(tmp_path / "evil.safetensors", {}, {"kind": "quantized", "plan": {"precisions": {}},
                                                  "model": {"library": "diffusers", "class": "os.system", "config": {}}})
    with pytest.raises(CheckpointError, match="not a diffusers model class"):
        load_quantized(tmp_path / "evil.safetensors")


def test_a_fisher_budget_plan_for_a_diffusers_model_runs_end_to_end_from_map_to_reloaded_samples(tmp_path):
    """Adapter -> Fisher map -> budget plan -> quantized model -> file -> samples, on a UNet2DConditionModel."""
    from lafq.fisher import FisherMap
    from lafq.fisher import fisher_map
    from lafq.models import capture_conditioning, from_diffusers
    from lafq.policy import Policy, make_plan, param_shapes
    from lafq.quantize import size_report
    from tests.diffusers_tiny import scheduler

    model = _diffusers_models()["UNet2DConditionModel"]()
    kw = _call_kwargs(model, 2)
    cond = capture_conditioning(model, lambda: model(torch.randn(2, 2, 8, 8), timestep=torch.tensor([1, 2]), **kw))
    den = from_diffusers(model, scheduler("v_prediction"), conditioning=cond)
    fm = fisher_map(den, torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(0)), bins=2, samples_per_bin=3)
    fm.save(tmp_path / "f.safetensors")
    assert torch.equal(FisherMap.load(tmp_path / "f.safetensors").fisher, fm.fisher)
    plan = make_plan(Policy(strategy="budget", avg_bits=6.0, statistic="mean"), fm, dict(model.named_parameters()))
    assert size_report(plan, param_shapes(model)).avg_bits <= 6.0
    q = quantize(copy.deepcopy(model), plan)
    save_quantized(tmp_path / "q.safetensors", q)
    back, _ = load_quantized(tmp_path / "q.safetensors")
    a, b = (from_diffusers(m, scheduler("v_prediction"), conditioning=cond).sample(2, steps=3, rows=[0, 1]) for m in (q, back))
    assert torch.equal(a, b)


def test_a_parameter_named_scale_is_not_taken_for_a_quantization_scale(tmp_path):
    """Only the `.scale` tensors of scaled formats must be positive; a model's own `scale` parameter may be 0."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return self.lin(x) * (1 + self.scale)

    torch.manual_seed(0)
    q = quantize(Scaled(), Plan({"lin.weight": "int8", "lin.bias": "fp32", "scale": "fp16"}))
    save_quantized(tmp_path / "s.safetensors", q)
    back, _ = load_quantized(tmp_path / "s.safetensors", into=Scaled())
    x = torch.randn(2, 4)
    assert torch.equal(back(x), q(x))
