"""Fisher maps of diffusers denoisers through the adapter layer, against an independent naive loop."""
import pytest
import torch

from lafq.fisher import fisher_map
from lafq.persample import sq_grads
from lafq.models import (
    capture_conditioning,
    from_diffusers,
    from_lafq_unet,
    load_diffusers,
)
from tests.conftest import TINY
from tests.diffusers_tiny import (
    save_pipeline_dir,
    scheduler,
    tiny_dit,
    tiny_transformer2d,
    tiny_unet2d,
    tiny_unet2d_condition,
)


def _conditioned(model, g):
    """The model, a Denoiser-ready Conditioning captured from one real call, and its channel count."""
    c = model.config.in_channels
    x = torch.randn(3, c, 8, 8, generator=g, dtype=torch.float64)
    if "Condition" in type(model).__name__:
        kw = {"encoder_hidden_states": torch.randn(3, 5, model.config.cross_attention_dim, generator=g, dtype=torch.float64)}
    else:
        kw = {"class_labels": torch.tensor([1, 2, 0])}
    cond = capture_conditioning(model, lambda: model(x, timestep=torch.tensor([10, 20, 30]), **kw))
    assert cond.kwargs.keys() == kw.keys()  # the sample and the timestep are not conditioning
    return cond, kw, c


def _naive_reference(model, sched, x0, noise, t, kw, rows):
    """One backward per sample, with diffusers' own add_noise / get_velocity: no lafq code involved."""
    acc = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(x0)):
        model.zero_grad(set_to_none=True)
        ti = t[i:i + 1]
        xt = sched.add_noise(x0[i:i + 1], noise[i:i + 1], ti)
        target = {"epsilon": noise[i:i + 1], "v_prediction": sched.get_velocity(x0[i:i + 1], noise[i:i + 1], ti),
                  "sample": x0[i:i + 1]}[sched.config.prediction_type]
        cond = {k: v[rows[i:i + 1]] for k, v in kw.items()}
        out = model(xt, timestep=ti, **cond, return_dict=False)[0][:, :x0.shape[1]]
        torch.nn.functional.mse_loss(out, target).backward()
        for k, p in model.named_parameters():
            if p.grad is not None:
                acc[k] += p.grad.pow(2)
    model.zero_grad(set_to_none=True)
    return acc


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("build", [tiny_unet2d_condition, tiny_dit, tiny_transformer2d],
                         ids=["UNet2DConditionModel", "DiT", "Transformer2DModel"])
def test_adapter_fisher_equals_a_naive_one_sample_loop_in_float64(build, prediction_type):
    model = build().double()
    g = torch.Generator().manual_seed(0)
    cond, kw, c = _conditioned(model, g)
    sched = scheduler(prediction_type)
    den = from_diffusers(model, sched, conditioning=cond)
    s = 5
    x0, noise = (torch.randn(s, c, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.randint(0, 1000, (s,), generator=g)
    rows = torch.randint(3, (s,), generator=g)
    ref = _naive_reference(model, sched, x0, noise, t, kw, rows)
    for method in ("hooks", "vmap", "naive"):
        got, _ = sq_grads(den, x0, noise, t, rows, method=method, chunk=2)  # chunking must not matter
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.allclose(got[k], ref[k], rtol=1e-9, atol=1e-20), (method, k)
    assert any(v > 0 for v in (ref[k].abs().sum() for k in ref))


def test_the_unet_adapter_fisher_equals_a_naive_one_sample_loop_in_float64():
    """The project U-Net through the same adapter path: one backward per sample, x_t and the loss written out
    here (epsilon prediction on its schedule), against every per-sample method."""
    from lafq.model import UNet

    torch.manual_seed(0)
    model = UNet(TINY).double()
    den = from_lafq_unet(model)
    g = torch.Generator().manual_seed(0)
    s = 5
    x0, noise = (torch.randn(s, 1, 28, 28, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.randint(0, 1000, (s,), generator=g)
    rows = torch.tensor([0, 3, 10, 7, 10])  # 10: the null class
    abar = den.schedule.alphas_cumprod.double()
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(s):
        model.zero_grad(set_to_none=True)
        a = abar[t[i]]
        xt = a.sqrt() * x0[i:i + 1] + (1 - a).sqrt() * noise[i:i + 1]
        torch.nn.functional.mse_loss(model(xt, t[i:i + 1], rows[i:i + 1]), noise[i:i + 1]).backward()
        for k, p in model.named_parameters():
            if p.grad is not None:
                ref[k] += p.grad.pow(2)
    model.zero_grad(set_to_none=True)
    for method in ("hooks", "vmap", "naive"):
        got, _ = sq_grads(den, x0, noise, t, rows, method=method, chunk=2)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.allclose(got[k], ref[k], rtol=1e-9, atol=1e-20), (method, k)


def test_hooks_fall_back_per_parameter_and_the_map_says_which():
    """DiT runs its conditioning embedder twice per forward (every block and the final layer), which the
    hooks cannot split: those parameters go to vmap, the rest stay on hooks, and the metadata names them."""
    model = tiny_dit().double()
    g = torch.Generator().manual_seed(0)
    cond, _, c = _conditioned(model, g)
    den = from_diffusers(model, scheduler("v_prediction"), conditioning=cond)
    images = torch.randn(6, c, 8, 8, generator=g, dtype=torch.float64)
    fast = fisher_map(den, images, bins=2, samples_per_bin=3, seed=1)
    slow = fisher_map(den, images, bins=2, samples_per_bin=3, seed=1, method="naive")
    assert torch.allclose(fast.fisher, slow.fisher, rtol=1e-9, atol=1e-30)
    fallback = fast.meta["fallback"]["vmap"]
    assert fallback and all(".norm1.emb." in n for n in fallback)
    assert fast.meta["methods"]["hooks"] == len(fast.names) - len(fallback)
    assert fast.meta["prediction_type"] == "v_prediction" and fast.meta["model"]["class"] == "DiTTransformer2DModel"
    assert fast.layer_names()[0] == "pos_embed.proj"  # a diffusers model's layers: two components of the path (lafq.layers)


def test_a_pipeline_folder_loads_through_from_pretrained_with_its_scheduler(tmp_path):
    model = tiny_unet2d()
    root = save_pipeline_dir(tmp_path / "pipe", model, "v_prediction")
    den = load_diffusers(root)
    assert type(den.module).__name__ == "UNet2DModel" and den.prediction_type == "v_prediction"
    assert den.sample_shape == (1, 8, 8) and den.T == 1000 and den.source["subfolder"] == "unet"
    for a, b in zip(den.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(den.schedule.alphas_cumprod, scheduler().alphas_cumprod.double())
    with pytest.raises(ValueError, match="no config.json"):
        load_diffusers(tmp_path)


def test_the_sample_target_and_the_eps_conversion_invert_each_other():
    model = tiny_unet2d().double()
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 10, 500, 999])
    for pt in ("epsilon", "v_prediction", "sample"):
        den = from_diffusers(model, scheduler(pt))
        xt = den.noisy(x0, noise, t)
        target = den.target(x0, noise, t)
        oracle = lambda fn, x, tt, kw, target=target: target
        perfect = type(den)(**{**den.__dict__, "call": oracle})
        assert torch.allclose(perfect.eps(xt, t), noise, atol=1e-8), pt
    assert den.with_conditioning(None).conditioning is None
    with pytest.raises(ValueError, match="prediction_type"):
        type(den)(**{**den.__dict__, "prediction_type": "flow"})


def test_conditioning_captured_from_a_real_guided_pipeline_call_scores_both_branches():
    """DiTPipeline batches the class labels with its null class (1000) for guidance; capturing its first
    transformer call and replaying the rows gives the null row of the class table Fisher too."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
    )

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=4, num_layers=1,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=2).eval()
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), latent_channels=2,
                        norm_num_groups=2, sample_size=8)  # never runs: the capture stops at the first denoiser call
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    cond = capture_conditioning(pipe.transformer, lambda: pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=4.0))
    assert cond.rows == 4 and cond.kwargs["class_labels"].tolist() == [1, 2, 1000, 1000]
    den = from_diffusers(dit, scheduler(), conditioning=cond, null_row=2)
    fm = fisher_map(den, torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0)), bins=1, samples_per_bin=12)
    table = fm.channel["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"][0, 0]
    assert not table.requires_grad
    assert table[1] > 0 and table[2] > 0 and table[1000] > 0  # both conditional labels and the null class
    assert table[0] == 0 and table[3] == 0  # labels the call never used
    x = den.sample(2, steps=2, rows=[0, 1], guidance=4.0)  # guided sampling replays the null row
    assert x.shape == (2, 2, 8, 8) and torch.isfinite(x).all()


def _unet_adapter():
    from lafq.model import UNet
    torch.manual_seed(0)
    return from_lafq_unet(UNet(TINY).eval()), "y", 28


def _diffusers_adapter():
    from lafq.models import Conditioning
    model = tiny_unet2d().eval()  # class-conditional: 3 class embeddings, the last the null class
    k = model.config.num_class_embeds
    cond = Conditioning({"class_labels": torch.arange(k)}, k)
    return from_diffusers(model, scheduler(), conditioning=cond, null_row=k - 1), "class_labels", 8


@pytest.mark.parametrize("adapter", [_unet_adapter, _diffusers_adapter], ids=["lafq-UNet", "diffusers-UNet2DModel"])
def test_per_class_maps_score_each_class_on_its_own_images_for_every_class_conditional_model(adapter):
    den, key, size = adapter()
    classes = list(range(den.conditioning.rows - 1))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4 * len(classes), *den.sample_shape, generator=g) * 2 - 1
    labels = torch.arange(len(images)) % len(classes)
    seen = []
    h = den.module.register_forward_pre_hook(
        lambda m, a, k: seen.append((k.get(key) if key in k else a[2]).clone()), with_kwargs=True)
    try:
        fm = fisher_map(den, images, labels=labels, per_class=True, p_null=0.0, bins=2, samples_per_bin=3,
                        method="naive")
    finally:
        h.remove()
    assert fm.groups == ["all"] + [str(c) for c in classes]
    assert torch.allclose(fm.fisher[0], fm.fisher[1:].mean(0))
    calls = torch.cat(seen).tolist()  # method="naive": one call per draw, in draw order
    per_group = 2 * 3  # bins x samples, one call per sample (naive)
    for gi, c in enumerate(classes):  # each class's draws condition on that class only
        assert set(calls[gi * per_group:(gi + 1) * per_group]) == {c}
    balanced = fisher_map(den, images, labels=labels, draws="balanced", p_null=1.0, bins=1, samples_per_bin=4)
    assert balanced.meta["draws"] == "balanced" and balanced.meta["p_null"] == 1.0
