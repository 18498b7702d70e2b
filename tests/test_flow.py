"""Flow-matching (rectified flow) models through the one path: diffusers' FlowMatchEulerDiscreteScheduler and a tiny
SD3-style transformer built from its config, checked against the scheduler's own scale_noise / set_timesteps / step,
a naive Fisher loop, and the real StableDiffusion3Pipeline from the same noise."""
import copy

import pytest
import torch

from lafq.diffusion import flow_sampling_sigmas
from lafq.models import Conditioning, from_diffusers
from tests.diffusers_tiny import flow_scheduler, tiny_sd3

ROWS = 3  # two prompts and the unconditional (negative) row


def _conditioning(dtype=torch.float32) -> Conditioning:
    g = torch.Generator().manual_seed(7)
    text = torch.randn(ROWS, 5, 6, generator=g, dtype=dtype)
    pooled = torch.randn(ROWS, 4, generator=g, dtype=dtype)
    text[-1], pooled[-1] = 0, 0  # the null row: zero embeddings, as SD3 uses for an empty negative prompt
    return Conditioning({"encoder_hidden_states": text, "pooled_projections": pooled}, ROWS)


def _den(model=None, shift=3.0):
    return from_diffusers(model or tiny_sd3(), flow_scheduler(shift), conditioning=_conditioning(), null_row=ROWS - 1)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noising_target_and_model_timesteps_are_the_schedulers_own(shift):
    den = _den(shift=shift)
    sched = flow_scheduler(shift)
    assert den.prediction_type == "flow" and den.T == 1000
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    # The scheduler's training grid, descending: index t of ours is its entry T - 1 - t.
    timesteps = sched.timesteps[999 - t]
    assert torch.equal(den.schedule.model_timesteps(t), timesteps)
    assert torch.allclose(den.noisy(x0, noise, t), sched.scale_noise(x0, timesteps, noise), rtol=0, atol=1e-6)
    assert torch.equal(den.target(x0, noise, t), noise - x0)


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampling_sigmas_and_one_euler_step_equal_the_schedulers(steps, shift):
    den, sched = _den(shift=shift), flow_scheduler(shift)
    sched.set_timesteps(steps)
    ours = flow_sampling_sigmas(den.schedule, steps)
    assert torch.equal(ours, sched.sigmas)
    x, v = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    step = sched.step(v, sched.timesteps[0], x, return_dict=False)[0]
    assert torch.equal(x + (ours[1] - ours[0]) * v, step)


def test_flow_fisher_equals_a_naive_one_sample_loop_in_float64():
    from lafq.persample import sq_grads

    model = tiny_sd3().double()
    sched = flow_scheduler(3.0)
    cond = _conditioning(torch.float64)
    den = from_diffusers(model, sched, conditioning=cond, null_row=ROWS - 1)
    g = torch.Generator().manual_seed(1)
    s = 4
    x0, noise = (torch.randn(s, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.randint(0, 1000, (s,), generator=g)
    rows = torch.randint(ROWS, (s,), generator=g)
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(s):  # diffusers' own noising and SD3's training target (noise - x0); no lafq code
        model.zero_grad(set_to_none=True)
        ts = sched.timesteps[999 - t[i:i + 1]]
        xt = sched.scale_noise(x0[i:i + 1], ts, noise[i:i + 1])
        kw = {k: v[rows[i:i + 1]] for k, v in cond.kwargs.items()}
        out = model(xt, timestep=ts, **kw, return_dict=False)[0]
        torch.nn.functional.mse_loss(out, noise[i:i + 1] - x0[i:i + 1]).backward()
        for k, p in model.named_parameters():
            if p.grad is not None:
                ref[k] += p.grad.pow(2)
    for method in ("hooks", "vmap", "naive"):
        got, _ = sq_grads(den, x0, noise, t, rows, method=method, chunk=2)
        for k in ref:
            # float32 sigmas in both (the scheduler's); the rest in float64
            assert torch.allclose(got[k], ref[k], rtol=1e-6, atol=1e-18), (method, k)
    assert any(ref[k].abs().sum() > 0 for k in ref)


def _pipeline_latents(model, latents, steps, guidance):
    """The real StableDiffusion3Pipeline (no text encoders or VAE: embeddings given, latents out) on prompt rows 0, 1."""
    from diffusers import StableDiffusion3Pipeline

    cond = _conditioning()
    text, pooled = cond.kwargs["encoder_hidden_states"], cond.kwargs["pooled_projections"]
    pipe = StableDiffusion3Pipeline(transformer=model, scheduler=flow_scheduler(3.0), vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    n = len(latents)
    return pipe(prompt_embeds=text[:n], pooled_prompt_embeds=pooled[:n],
                negative_prompt_embeds=text[-1:].expand(n, -1, -1), negative_pooled_prompt_embeds=pooled[-1:].expand(n, -1),
                guidance_scale=guidance, num_inference_steps=steps, latents=latents.clone(), output_type="latent").images


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_lafq_sampling_equals_the_real_sd3_pipeline_from_the_same_noise(guidance):
    model = tiny_sd3()
    den = _den(model)
    ours = den.sample(2, steps=4, seed=3, rows=[0, 1], guidance=guidance)
    latents = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))  # lafq's noise rule
    theirs = _pipeline_latents(model, latents, 4, guidance)
    # Same arithmetic; guidance batches the two branches in another order than the pipeline (float32 rounding).
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, latents, atol=1e-2)


def test_a_flow_model_goes_from_fisher_map_to_a_budget_plan_a_reloaded_file_and_pipeline_samples(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lafq.fisher import fisher_map
    from lafq.models import load
    from lafq.policy import Policy, make_plan, param_shapes
    from lafq.quantize import load_quantized, quantize, save_quantized, size_report

    model = tiny_sd3()
    (tmp_path / "p").mkdir()
    model.save_pretrained(tmp_path / "p" / "transformer", safe_serialization=True)
    flow_scheduler(3.0).save_pretrained(tmp_path / "p" / "scheduler")
    loaded = load(tmp_path / "p").with_conditioning(_conditioning(), ROWS - 1)  # the real from_pretrained path
    assert loaded.prediction_type == "flow" and loaded.schedule.shift == 3.0
    images = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    fm = fisher_map(loaded, images, labels=torch.tensor([0, 1, 0, 1, 0, 1]), bins=2, samples_per_bin=3)
    assert torch.isfinite(fm.fisher).all() and (fm.fisher > 0).any()
    plan = make_plan(Policy(strategy="budget", avg_bits=8.0, statistic="mean"), fm, dict(loaded.module.named_parameters()))
    assert size_report(plan, param_shapes(loaded.module)).avg_bits <= 8.0
    assert len({p for p in plan.precisions.values()}) > 1  # a mixed plan, not one format
    q = quantize(copy.deepcopy(loaded.module), plan)
    save_quantized(tmp_path / "q.safetensors", q)
    back, _ = load_quantized(tmp_path / "q.safetensors", like=loaded.module)
    for (k, a), (_, b) in zip(q.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    from dataclasses import replace
    ours = replace(loaded, module=back).sample(2, steps=3, seed=5, rows=[0, 1], guidance=2.0)
    latents = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(ours, _pipeline_latents(back, latents, 3, 2.0), rtol=0, atol=1e-5)
    assert isinstance(FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "p" / "scheduler"),
                      FlowMatchEulerDiscreteScheduler)


def test_unsupported_flow_options_and_samplers_are_refused_in_one_line():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lafq.pipeline import SampleSpec, denoise

    with pytest.raises(ValueError, match="use_dynamic_shifting is not supported"):
        from_diffusers(tiny_sd3(), FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="samples with its scheduler's Euler steps"):
        denoise(_den(), SampleSpec(n=1, steps=2, sampler="ddpm", labels=(0,)))


def test_the_inside_views_follow_a_flow_models_own_steps_and_clean_estimate():
    from lafq.inside import activation_trace, saliency

    den = _den()
    trace = activation_trace(den, 0, steps=3, guidance=1.0)
    assert trace.timesteps == [round(float(s) * 1000) for s in flow_sampling_sigmas(den.schedule, 3)[:-1]]
    assert trace.matrix.shape[1] == 3
    image = torch.rand(2, 8, 8) * 2 - 1
    out = saliency(den, image, 0, 999)  # sigma = 1: x_t is pure noise and x0_hat = x_t - v
    xt = den.noisy(image[None], torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999]))
    with torch.no_grad():
        v = den.predict(xt, torch.tensor([999]), torch.tensor([0]))
    assert torch.allclose(out["x0_hat"], (xt - v).clamp(-1, 1)[0].mean(0), atol=1e-6)


def test_a_flow_transformers_linear_layers_export_to_torchao_and_sample(tmp_path):
    pytest.importorskip("torchao", reason="torchao is optional (requirements-export.txt)")
    import warnings

    from torchao.quantization import quantize_

    from lafq.export import export_plan, load_export
    from lafq.policy import Plan
    from lafq.precision import fallback

    model = tiny_sd3()
    plan = Plan({n: fallback(tuple(p.shape), "int8") for n, p in model.named_parameters()})
    exp = export_plan(plan, model, "torchao", component="transformer")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(exp.converted) == set(linears) and len(linears) > 10  # a transformer: its Linears really convert
    exp.save(tmp_path / "ao.json")
    q = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(q, load_export(tmp_path / "ao.json"), filter_fn=None)
    a, b = (_den(m).sample(2, steps=3, seed=0, rows=[0, 1], guidance=2.0) for m in (model, q))
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert (a - b).abs().mean() < 0.1 * a.abs().mean()
