"""`python -m lafq export`: a plan file in, the library's config file out, one-line errors."""
import copy
import json

import pytest

from lafq.cli import main
from lafq.policy import Plan
from lafq.precision import fallback


def _plan_file(model, tmp_path, precision="int8"):
    plan = Plan({n: fallback(tuple(p.shape), precision) for n, p in model.named_parameters()})
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return path


def test_export_writes_a_torchao_config_for_the_project_unet(tiny_model, tiny_ckpt, tmp_path, capsys):
    pytest.importorskip("torchao", reason="torchao is optional (requirements-export.txt)")
    from lafq.export import load_export

    plan = _plan_file(tiny_model, tmp_path)
    assert main(["export", "--plan", str(plan), "--to", "torchao", "--model", str(tiny_ckpt), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    out = tmp_path / "plan.torchao.json"
    assert res["out"] == str(out) and res["converted"] > 0
    cfg = load_export(out)
    linears = {n for n, m in copy.deepcopy(tiny_model).named_modules() if type(m).__name__ == "Linear"}
    assert set(cfg.fqn_to_config) == linears  # time MLP and each block's embedding projection


def test_export_errors_are_one_line(tiny_ckpt, tmp_path, capsys):
    assert main(["export", "--plan", str(tmp_path / "none.json"), "--to", "quanto", "--model", str(tiny_ckpt)]) == 2
    assert "no such plan file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"precisions": {"nope.weight": "int8"}}))
    assert main(["export", "--plan", str(bad), "--to", "quanto", "--model", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "lacks" in err and len(err.strip().splitlines()) == 1
    assert main(["export", "--plan", str(bad), "--to", "diffusers", "--model", str(tiny_ckpt)]) == 2
    assert "diffusers model folder" in capsys.readouterr().err


def test_export_reads_a_diffusers_pipeline_folder_and_writes_a_torchao_config_diffusers_loads(tmp_path, capsys):
    pytest.importorskip("torchao", reason="torchao is optional (requirements-export.txt)")
    from diffusers import TorchAoConfig

    from lafq.export import load_export
    from tests.diffusers_tiny import save_pipeline_dir, tiny_unet2d

    model = tiny_unet2d()
    root = save_pipeline_dir(tmp_path / "pipe", model)
    plan = _plan_file(model, tmp_path, "int4")
    out = tmp_path / "d.json"
    assert main(["export", "--plan", str(plan), "--to", "diffusers", "--model", str(root), "--out", str(out)]) == 0
    assert "modules converted for diffusers" in capsys.readouterr().out
    cfg = load_export(out)
    assert isinstance(cfg, TorchAoConfig) and cfg.quant_type.fqn_to_config


def test_fisher_model_then_quantize_model_run_on_a_diffusers_folder_with_saved_conditioning(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from lafq.fisher import FisherMap
    from lafq.models import capture_conditioning, load_conditioning, save_conditioning
    from tests.diffusers_tiny import save_pipeline_dir, tiny_unet2d_condition

    model = tiny_unet2d_condition()
    root = save_pipeline_dir(tmp_path / "pipe", model, "v_prediction")
    ehs = torch.randn(2, 5, 6)
    cond = capture_conditioning(model, lambda: model(torch.randn(2, 2, 8, 8), timestep=torch.tensor([1, 2]),
                                                     encoder_hidden_states=ehs, cross_attention_kwargs={"scale": 1.0}))
    save_conditioning(tmp_path / "cond.safetensors", cond)
    back = load_conditioning(tmp_path / "cond.safetensors")
    assert back.rows == 2 and torch.equal(back.kwargs["encoder_hidden_states"], ehs)
    assert back.kwargs["cross_attention_kwargs"] == {"scale": 1.0}
    save_file({"images": torch.randn(6, 2, 8, 8)}, str(tmp_path / "latents.safetensors"))
    out = tmp_path / "f.safetensors"
    argv = ["fisher", "--model", str(root), "--images", str(tmp_path / "latents.safetensors"), "--conditioning",
            str(tmp_path / "cond.safetensors"), "--bins", "2", "--samples", "3", "--device", "cpu", "--out", str(out), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["class"] == "UNet2DConditionModel" and res["prediction_type"] == "v_prediction"
    fm = FisherMap.load(out)
    assert fm.fisher.shape == (1, len(list(model.parameters())), 2) and (fm.fisher > 0).any()
    q = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", str(root), "--fisher", str(out), "--avg-bits", "6", "--out", str(q),
                 "--plan-out", str(tmp_path / "plan.json"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["size"]["avg_bits"] <= 6 and res["size"]["file_bytes"] == q.stat().st_size
    from lafq.quantize import load_quantized
    assert type(load_quantized(q)[0]).__name__ == "QuantizedUNet2DConditionModel"
    save_file({"images": torch.randn(6, 1, 8, 8)}, str(tmp_path / "wrong.safetensors"))
    assert main([*argv[:4], str(tmp_path / "wrong.safetensors"), *argv[5:]]) == 2
    assert "the model takes (2, 8, 8)" in capsys.readouterr().err


def test_a_diffusers_export_of_a_dit_pipeline_is_for_its_transformer_and_a_missing_component_is_refused(tmp_path,
                                                                                                         capsys):
    """A fixed "unet" default made diffusers warn once and sample a DiT pipeline in FP32 (the export ignored)."""
    pytest.importorskip("torchao", reason="torchao is optional (requirements-export.txt)")
    from tests.diffusers_tiny import save_pipeline_dir, tiny_dit

    model = tiny_dit()
    root = save_pipeline_dir(tmp_path / "dit", model)
    plan = _plan_file(model, tmp_path, "int8")
    assert main(["export", "--plan", str(plan), "--to", "diffusers", "--model", str(root), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["component"] == "transformer"
    assert json.loads((tmp_path / "plan.diffusers.json").read_text())["config"]["component"] == "transformer"
    assert main(["export", "--plan", str(plan), "--to", "diffusers", "--model", str(root), "--component", "unet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {root} is a pipeline without a 'unet' component (it has transformer, scheduler; its "
                   "denoiser is 'transformer')")
    pytest.importorskip("accelerate", reason="diffusers' torchao loader needs accelerate (requirements-export.txt)")
    import torch
    from diffusers import DiTTransformer2DModel

    from lafq.export import load_export

    cfg = load_export(tmp_path / "plan.diffusers.json")  # the transformer loads quantized: its outputs change
    fp32 = DiTTransformer2DModel.from_pretrained(root, subfolder="transformer").eval()
    q = DiTTransformer2DModel.from_pretrained(root, subfolder="transformer", quantization_config=cfg,
                                              dtype=torch.float32).eval()
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(timestep=torch.tensor([10, 500]), class_labels=torch.tensor([0, 1]), return_dict=False)
    with torch.no_grad():
        a, b = fp32(x, **kw)[0], q(x, **kw)[0]
    assert not torch.equal(a, b) and (a - b).abs().mean() < 0.5 * a.abs().mean()


@pytest.mark.parametrize("plan, message", [
    ('{"precisions": ["fp16"]}', "'precisions' must be"),  # the weak reader took a list and crashed later
    ('{"precisions": {"nope.weight": "int8"}}', "plan names 1 parameters the model lacks"),
    ('{"precisions": {"conv_in.bias": "int4"}}', "plan asks for integer formats on vectors"),
])
def test_export_and_quantize_model_read_plans_as_strictly_as_quantize(tmp_path, capsys, plan, message):
    from tests.diffusers_tiny import save_pipeline_dir, tiny_unet2d

    root = save_pipeline_dir(tmp_path / "pipe", tiny_unet2d())
    (tmp_path / "p.json").write_text(plan)
    for argv in (["export", "--to", "quanto"], ["quantize", "--out", str(tmp_path / "q.safetensors")]):
        assert main([*argv, "--plan", str(tmp_path / "p.json"), "--model", str(root)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "q.safetensors").exists()


def test_fisher_model_refuses_nan_images_and_out_of_range_sizes_in_one_line(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from tests.diffusers_tiny import save_pipeline_dir, tiny_unet2d

    root = save_pipeline_dir(tmp_path / "pipe", tiny_unet2d())
    images = torch.randn(4, 2, 8, 8)
    images[1, 0, 2, 2] = float("nan")
    save_file({"images": images}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "f.safetensors"
    assert main(["fisher", "--model", str(root), "--images", str(tmp_path / "x.safetensors"), "--bins", "2",
                 "--samples", "2", "--out", str(out)]) == 2
    assert "holds 1 NaN or infinite values" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):  # argparse: the range, exit 2
        main(["fisher", "--model", str(root), "--images", str(tmp_path / "x.safetensors"), "--samples",
              "1000000000", "--out", str(out)])
    assert "--samples must be in [1, 100000]" in capsys.readouterr().err


def test_a_misspelled_local_path_is_refused_at_once_and_json_errors_are_json(tmp_path, capsys):
    plan = tmp_path / "p.json"
    plan.write_text('{"precisions": {}}')
    missing = tmp_path / "no-such" / "pipe"  # cannot be a Hub id (owner/name): no Hub round trips
    assert main(["export", "--plan", str(plan), "--to", "quanto", "--model", str(missing), "--json"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"error: no such folder: {missing} (a Hub model is named owner/name)"
    assert json.loads(out) == {"error": f"no such folder: {missing} (a Hub model is named owner/name)", "exit_code": 2}


def test_an_argument_argparse_refuses_under_json_still_answers_json_on_stdout(capsys):
    with pytest.raises(SystemExit):
        main(["fisher", "--model", "x", "--samples", "0", "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": "invalid arguments (the reason is on stderr)", "exit_code": 2}
    assert "--samples must be in [1, 100000]" in err


def test_a_plan_records_the_model_it_was_made_for_and_export_defaults_to_it(tmp_path, capsys):
    """`export --plan plan.json` without --model used to quantize the shipped MNIST U-Net ("plan names 208
    parameters the model lacks"): the plan now says what it was made for."""
    from lafq.planfile import read_plan
    from tests.diffusers_tiny import save_pipeline_dir, tiny_unet2d

    root = save_pipeline_dir(tmp_path / "pipe", tiny_unet2d())
    plan = tmp_path / "plan.json"
    assert main(["quantize", "--model", str(root), "--strategy", "uniform", "--target", "int8", "--plan-out",
                 str(plan), "--json"]) == 0
    capsys.readouterr()
    made_for = read_plan(plan.read_text()).model
    assert made_for["path"] == str(root) and made_for["class"] == "UNet2DModel" and len(made_for["digest"]) == 16
    assert main(["export", "--plan", str(plan), "--to", "quanto", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == str(root) and res["converted"] > 0
    assert main(["quantize", "--plan", str(plan), "--json"]) == 0  # quantize --plan loads it too
    assert json.loads(capsys.readouterr().out)["model"] == str(root)


def test_export_says_how_many_bytes_the_target_library_really_stores(tmp_path, capsys):
    """torchao converts nn.Linear only: on a convolutional U-Net most of an INT8 plan stays FP32 there."""
    from lafq.export import stored_bytes
    from tests.diffusers_tiny import save_pipeline_dir, tiny_unet2d

    model = tiny_unet2d()
    root = save_pipeline_dir(tmp_path / "pipe", model)
    plan = tmp_path / "plan.json"
    assert main(["quantize", "--model", str(root), "--strategy", "uniform", "--target", "int8", "--plan-out",
                 str(plan), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", "--plan", str(plan), "--to", "quanto"]) == 0
    out = capsys.readouterr().out
    assert "quanto stores about" in out and "the plan in LAFQ's own storage takes" in out
    assert main(["export", "--plan", str(plan), "--to", "quanto", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    assert res["fp32_bytes"] == fp32 and res["plan_bytes"] <= res["stored_bytes"] < fp32
    assert stored_bytes(model, {}) == fp32  # nothing converted: everything in the model's dtype


def test_a_cross_attention_model_without_its_conditioning_is_refused_in_one_line(tmp_path, capsys):
    """It used to end in a 42-line traceback from inside the model's forward."""
    import torch
    from safetensors.torch import save_file

    from tests.diffusers_tiny import save_pipeline_dir, tiny_unet2d_condition

    model = tiny_unet2d_condition()
    root = save_pipeline_dir(tmp_path / "pipe", model)
    save_file({"images": torch.randn(4, model.config.in_channels, 8, 8)}, str(tmp_path / "x.safetensors"))
    assert main(["fisher", "--model", str(root), "--images", str(tmp_path / "x.safetensors"), "--bins", "1",
                 "--samples", "2", "--out", str(tmp_path / "f.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: UNet2DConditionModel needs encoder_hidden_states, which nothing supplies: capture it from "
                   "one real call (lafq.models.capture_conditioning; the CLI's --conditioning FILE)")
    assert not (tmp_path / "f.safetensors").exists()


def test_a_plan_made_for_another_class_without_a_path_asks_for_model(tmp_path, capsys):
    plan = tmp_path / "app-plan.json"
    plan.write_text('{"precisions": {}, "model": {"class": "UNet2DModel", "digest": "0123456789abcdef"}}')
    for argv in (["export", "--plan", str(plan), "--to", "quanto"], ["quantize", "--plan", str(plan)]):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (f"error: {plan} was made for a UNet2DModel and does not say where "
                                                   "it is: pass --model")
