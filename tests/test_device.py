"""Device choice, and the same results on a GPU as on the CPU (the GPU half runs only where one is present)."""
import json

import pytest
import torch

from lafq.cli import main
from lafq.device import resolve_device
from lafq.diffusion import ddim_sample, linear_schedule
from lafq.model import UNet
from tests.conftest import TINY

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_falls_back_to_cpu_and_cuda_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA GPU.*'cpu' or 'auto'"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'; choose one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_cli_refuses_an_unknown_device_in_one_line(tiny_ckpt, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tiny_ckpt), "--n", "2", "--steps", "2", "--device", "tpu",
                 "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown device 'tpu'") and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


def test_cli_reports_the_device_it_sampled_on(tiny_ckpt, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tiny_ckpt), "--n", "2", "--steps", "2", "--device", "cpu", "--json",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["device"] == "cpu"


@cuda
def test_gpu_sampling_matches_cpu_from_the_same_seed(tiny_model):
    s = linear_schedule()
    kw = dict(steps=4, labels=torch.arange(6) % 10, guidance=1.5, null_class=10)
    cpu = ddim_sample(tiny_model, s, 6, generator=torch.Generator().manual_seed(3), **kw)
    gpu = ddim_sample(tiny_model.cuda(), s, 6, generator=torch.Generator().manual_seed(3), device="cuda", **kw)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-2)  # TF32 convolutions on the GPU: close, not equal


@cuda
def test_gpu_fisher_equals_cpu_in_float64():
    from lafq.models import from_lafq_unet
    from lafq.persample import sq_grads

    torch.manual_seed(0)
    m = UNet(TINY).double().eval()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 1, 28, 28, generator=g, dtype=torch.float64)
    y, t = torch.tensor([0, 1, 2, 10, 9]), torch.randint(0, 1000, (5,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    cpu, _ = sq_grads(from_lafq_unet(m), x0, noise, t, y, chunk=2)
    gpu, _ = sq_grads(from_lafq_unet(m.cuda()), *(v.cuda() for v in (x0, noise, t)), y.cuda(), chunk=2)
    for k in cpu:
        # rtol: the sinusoidal embedding is float32 (sin of t * freq, t up to 999) and CUDA's sin rounds
        # differently from the CPU's; measured 3e-5 relative on embed.time_mlp.0.weight, 1e-9 elsewhere.
        assert torch.allclose(gpu[k].cpu(), cpu[k], rtol=1e-3, atol=1e-20), k


@cuda
def test_gpu_fisher_map_matches_cpu():
    from lafq.data import load_dataset
    from lafq.fisher import compute_fisher

    torch.manual_seed(0)
    m = UNet(TINY).eval()
    x, y = load_dataset("mnist-test10k").tensors()
    cpu = compute_fisher(m, x, y, bins=3, samples_per_bin=4, method="hooks")
    gpu = compute_fisher(m.cuda(), x, y, bins=3, samples_per_bin=4, method="hooks")
    assert gpu.meta["checkpoint_digest"] == cpu.meta["checkpoint_digest"]
    assert torch.allclose(gpu.fisher, cpu.fisher, rtol=5e-2)  # float32 with TF32 on the GPU


@cuda
def test_quantized_model_runs_on_gpu_like_on_cpu(tiny_model):
    import copy

    from lafq.policy import Plan
    from lafq.precision import fallback
    from lafq.quantize import quantize

    kinds = ("int8", "int4", "fp16", "bf16")  # every storage kind, each dequantized on the GPU
    plan = Plan({n: fallback(tuple(p.shape), kinds[i % 4]) for i, (n, p) in enumerate(tiny_model.named_parameters())})
    q = quantize(copy.deepcopy(tiny_model), plan)
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        cpu = q(x, t, y)
        gpu = q.to("cuda")(x.cuda(), t.cuda(), y.cuda()).cpu()
    assert torch.allclose(gpu, cpu, atol=1e-2)


@cuda
def test_training_on_gpu_resumes_on_cpu(tmp_path):
    from lafq.checkpoint import load_unet
    from lafq.train import TrainConfig, train

    cfg = TrainConfig(steps=8, batch_size=8, warmup=2, log_every=4, save_every=4, sample_every=8)
    rec = train(tmp_path, cfg, TINY, progress=False, until=4, device="cuda")
    assert rec["step"] == 4
    rec = train(tmp_path, cfg, TINY, progress=False, device="cpu")  # the saved state is device-free
    assert rec["step"] == 8 and rec["loss"] == rec["loss"]
    model, meta = load_unet(tmp_path / "unet.safetensors")
    assert meta["train"]["steps"] == 8 and (tmp_path / "samples.png").exists()


@cuda
def test_app_state_on_gpu_plans_quantizes_samples_and_traces(tiny_model):
    from tests.conftest import unet_app_state
    from lafq.data import load_dataset
    from lafq.device import model_device
    from lafq.fisher import compute_fisher
    from lafq.inside import activation_trace, quantization_error_trace, saliency
    from lafq.pipeline import SampleSpec, generate
    from lafq.policy import Policy

    x, y = load_dataset("mnist-test10k").tensors()
    fm = compute_fisher(tiny_model, x, y, bins=2, samples_per_bin=2, method="naive")
    state = unet_app_state(tiny_model.cuda(), fm, "", device="cuda")
    for policy in (Policy(), Policy(strategy="budget", avg_bits=6.0)):  # budget scores weights beside the map
        q = state.quantized(state.plan(policy))
        assert model_device(q).type == "cuda"
        images, _ = generate(q, SampleSpec(n=3, steps=2), device=state.device)
        assert images.dtype == torch.uint8 and images.device.type == "cpu"
    tr = quantization_error_trace(state.model, q, 3, steps=3)
    assert tr.matrix.device.type == "cpu" and torch.isfinite(tr.matrix).all()
    assert torch.isfinite(activation_trace(state.model, 3, steps=3).matrix).all()
    assert saliency(state.model, x[0], 3, 500)["saliency"].shape == (28, 28)


def test_strict_fp32_leaves_the_cpu_alone_and_turns_tf32_off_on_a_gpu(monkeypatch):
    from lafq.device import strict_fp32

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert strict_fp32("cpu") is False and torch.backends.cudnn.allow_tf32
    assert strict_fp32("cuda") is True
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@cuda
def test_the_report_runs_on_a_gpu_with_plans_made_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)  # restored after
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    assert main(["report", "--device", "cuda", "--quick", "--n", "4", "--steps", "1", "--seeds", "1",
                 "--random-seeds", "1", "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "report.md").read_text()
    assert "--device cuda" in text and torch.cuda.get_device_name(0) in text
