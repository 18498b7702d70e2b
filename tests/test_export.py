"""Exports of a plan to torchao, diffusers and optimum-quanto, applied with the real libraries on the CPU."""
import copy
import json
import warnings

import pytest
import torch

from lafq.export import ExportError, apply_quanto, export_plan, load_export
from lafq.models import from_diffusers
from lafq.policy import Plan
from lafq.precision import fallback
from tests.diffusers_tiny import export_unet2d, scheduler

CYCLE = ["int8", "int4", "int4-g32", "fp16", "fp32", "int4-g64", "bf16"]


def _needs(module, package):
    return pytest.importorskip(module, reason=f"{package} is optional (requirements-export.txt); the export to it is untested without it")


@pytest.fixture(scope="module")
def model_and_plan():
    model = export_unet2d()
    plan = Plan({n: fallback(tuple(p.shape), CYCLE[i % len(CYCLE)]) for i, (n, p) in enumerate(model.named_parameters())})
    return model, plan


def _samples(model):
    return from_diffusers(model, scheduler()).sample(2, steps=3, seed=0)


def _check_samples(quantized, model):
    got, ref = _samples(quantized), _samples(model)
    assert torch.isfinite(got).all() and got.shape == (2, 1, 8, 8)
    assert not torch.equal(got, ref)  # the export really changed weights
    assert (got - ref).abs().mean() < 0.5 * ref.abs().mean()  # ... and kept the model close


def test_torchao_export_loads_as_fqn_to_config_and_the_quantized_model_samples(model_and_plan, tmp_path):
    _needs("torchao", "torchao")
    from torchao.quantization import (
        FqnToConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup

    model, plan = model_and_plan
    exp = export_plan(plan, model, "torchao")
    exp.save(tmp_path / "ao.json")
    cfg = load_export(tmp_path / "ao.json")
    assert isinstance(cfg, FqnToConfig) and set(cfg.fqn_to_config) == set(exp.converted)
    for name, p in exp.converted.items():  # the precision each Linear carries maps to the matching config
        c = cfg.fqn_to_config[name]
        if p == "int8":
            assert isinstance(c, Int8WeightOnlyConfig)
        else:
            assert isinstance(c, IntxWeightOnlyConfig) and c.weight_dtype == torch.int4
            approximated = any(a.startswith(f"{name}:") for a in exp.approximations)  # group does not divide
            assert c.granularity == (PerAxis(0) if p == "int4" or approximated else PerGroup(int(p[-2:])))
    assert {"int8", "int4", "int4-g32", "int4-g64"} <= set(exp.converted.values())
    assert any(isinstance(getattr(c, "granularity", None), PerGroup) for c in cfg.fqn_to_config.values())
    assert any("Conv2d" in why for why in exp.not_converted.values())
    assert any(why.startswith("fp16") for why in exp.not_converted.values())
    q = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(q, cfg, filter_fn=None)
    assert all(type(q.get_submodule(n).weight).__name__ != "Parameter" for n in exp.converted)
    _check_samples(q, model)


def test_diffusers_export_loads_through_from_pretrained_and_a_pipeline_samples(model_and_plan, tmp_path):
    _needs("torchao", "torchao")
    _needs("accelerate", "accelerate")
    from diffusers import (
        DDPMPipeline,
        PipelineQuantizationConfig,
        TorchAoConfig,
        UNet2DModel,
    )

    model, plan = model_and_plan
    exp = export_plan(plan, model, "diffusers")
    exp.save(tmp_path / "d.json")
    cfg = load_export(tmp_path / "d.json")
    assert isinstance(cfg, TorchAoConfig) and cfg.modules_to_not_convert
    planned_float = {n for n, why in exp.not_converted.items() if "in the plan" in why}
    assert set(cfg.modules_to_not_convert) <= planned_float
    model.save_pretrained(tmp_path / "unet")
    q = UNet2DModel.from_pretrained(tmp_path / "unet", quantization_config=cfg, dtype=torch.float32)
    assert {n for n, m in q.named_modules() if type(getattr(m, "weight", None)).__name__ not in ("Parameter", "NoneType")} \
        == set(exp.converted)
    _check_samples(q, model)
    pipe_dir = tmp_path / "pipe"
    DDPMPipeline(unet=model, scheduler=scheduler()).save_pretrained(pipe_dir)
    pcfg = load_export(tmp_path / "d.json", pipeline=True)
    assert isinstance(pcfg, PipelineQuantizationConfig)
    pipe = DDPMPipeline.from_pretrained(pipe_dir, quantization_config=pcfg, dtype=torch.float32)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 8, 8, 1) and (images >= 0).all() and (images <= 1).all()


def test_quanto_export_runs_include_and_exclude_calls_and_the_frozen_model_samples(model_and_plan, tmp_path):
    _needs("optimum.quanto", "optimum-quanto")
    import shutil
    if not shutil.which("c++"):
        pytest.skip("optimum-quanto's int4 CPU kernel is a C++ extension it builds on first use; no C++ compiler here")
    model, plan = model_and_plan
    exp = export_plan(plan, model, "quanto")
    exp.save(tmp_path / "q.json")
    calls = load_export(tmp_path / "q.json")
    assert {c["weights"] for c in calls} == {"qint8", "qint4"}
    assert all(set(c["exclude"]) == set(exp.not_converted) for c in calls)
    assert any("quanto's qint4 chooses its own group size" in a for a in exp.approximations)
    q = apply_quanto(copy.deepcopy(model), calls)
    qtypes = {n: type(m).__name__ for n, m in q.named_modules() if n in exp.converted}
    assert set(qtypes.values()) <= {"QLinear", "QConv2d"} and len(qtypes) == len(exp.converted)
    _check_samples(q, model)


def test_the_export_file_names_what_was_left_out_and_why(model_and_plan, tmp_path):
    _needs("torchao", "torchao")
    model, plan = model_and_plan
    exp = export_plan(plan, model, "torchao")
    exp.save(tmp_path / "ao.json")
    d = json.loads((tmp_path / "ao.json").read_text())
    assert d["kind"] == "lafq-export" and d["library"]["name"] == "torchao" and d["library"]["version"]
    assert set(d["modules"]["converted"]) | set(d["modules"]["not_converted"]) == \
        {n.rsplit(".", 1)[0] for n in plan.precisions if n.endswith(".weight")}
    with pytest.raises(ExportError, match="choose one of"):
        export_plan(plan, model, "onnx")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ExportError, match="not a lafq export file"):
        load_export(tmp_path / "bad.json")


def test_the_gpu_int4_kernel_export_uses_tinygemm_group_sizes_and_round_trips(model_and_plan, tmp_path):
    """torchao 0.18 has no CPU kernel for Int4WeightOnlyConfig (mslk or CUDA only): this checks the config,
    not a forward."""
    _needs("torchao", "torchao")
    from torchao.quantization import Int4WeightOnlyConfig

    model, plan = model_and_plan
    exp = export_plan(plan, model, "torchao", int4_kernel="tinygemm")
    exp.save(tmp_path / "t.json")
    cfg = load_export(tmp_path / "t.json")
    int4 = {n: c for n, c in cfg.fqn_to_config.items() if isinstance(c, Int4WeightOnlyConfig)}
    assert int4 and all(c.group_size in (32, 64, 128) for c in int4.values())
    assert all(model.get_submodule(n).in_features % c.group_size == 0 for n, c in int4.items())
    assert any("group size 128" in a for a in exp.approximations)
    with pytest.raises(ExportError, match="int4 kernel"):
        export_plan(plan, model, "torchao", int4_kernel="marlin")
