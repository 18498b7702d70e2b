import copy
import dataclasses
import threading

import pytest

import torch

from lafq.inside import activation_trace


def test_concurrent_traces_on_one_shared_model_do_not_mix(tiny_model):
    """The app serves several requests on one model: each trace must see only its own forwards."""
    results, errors = {}, []

    def work(steps):
        try:
            for _ in range(3):
                results[steps] = activation_trace(tiny_model, 3, steps=steps)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(s,)) for s in (5, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    layers = results[5].layers
    assert results[5].matrix.shape == (len(layers), 5) and results[7].matrix.shape == (len(layers), 7)
    assert all(not m._forward_hooks for m in tiny_model.modules())


def test_trace_is_deterministic(tiny_model):
    a = activation_trace(tiny_model, 1, steps=3, seed=2)
    b = activation_trace(tiny_model, 1, steps=3, seed=2)
    assert torch.equal(a.matrix, b.matrix) and a.timesteps == b.timesteps and a.timesteps[-1] == 0


@pytest.mark.parametrize("which", ["lafq-UNet", "diffusers-UNet2DModel", "DiT"])
def test_every_trace_observes_the_models_own_layers_along_the_samplers_trajectory(which, tiny_model):
    from lafq.inside import quantization_error_trace, saliency
    from lafq.models import Conditioning, from_diffusers, from_lafq_unet, with_class_conditioning
    from lafq.pipeline import SampleSpec, denoise
    from lafq.policy import Policy, make_plan
    from lafq.quantize import quantize
    from tests.diffusers_tiny import scheduler, tiny_dit, tiny_unet2d

    if which == "lafq-UNet":
        den = from_lafq_unet(tiny_model)
    elif which == "DiT":
        den = from_diffusers(tiny_dit().eval(), scheduler())
    else:
        den = from_diffusers(tiny_unet2d().eval(), scheduler())
    if which == "DiT":
        den = den.with_conditioning(Conditioning({"class_labels": torch.tensor([0, 1])}, 2))
    elif which != "lafq-UNet":
        den = with_class_conditioning(den, 2)
    label = 1 if den.conditioning is not None else None
    guidance = 1.5 if den.null_row is not None else 1.0  # guided where the model has a null row: half the batch kept
    tr = activation_trace(den, label, steps=3, seed=4, guidance=guidance)
    expected = {"lafq-UNet": {"stem", "mid", "head"}, "diffusers-UNet2DModel": {"conv_in", "down_blocks.0"},
                "DiT": {"transformer_blocks.0"}}[which]
    assert expected <= set(tr.layers) and torch.isfinite(tr.matrix).all() and tr.matrix.shape[1] == 3
    assert expected <= set(tr.maps) and all(m.dim() == 3 and m.shape[0] == 3 for m in tr.maps.values())
    assert not any(m._forward_hooks for m in den.module.modules())  # the traces hook a private copy
    spec = SampleSpec(n=1, labels=() if label is None else (label,), steps=3, guidance=guidance, seed=4, batch_size=1)
    assert torch.equal(tr.image, denoise(den, spec)[0][0].cpu())  # the sampler's trajectory: the same noise rule
    q = quantize(copy.deepcopy(den.module), make_plan(Policy(strategy="uniform", target="int4"), None,
                                                      dict(den.module.named_parameters())))
    err = quantization_error_trace(den, dataclasses.replace(den, module=q), label, steps=3, guidance=guidance)
    assert err.layers and (err.matrix > 0).any() and torch.isfinite(err.matrix).all()
    image = torch.rand(den.sample_shape) * 2 - 1
    r = saliency(den, image, label, 10)
    assert r["saliency"].shape == den.sample_shape[1:] and torch.isfinite(r["saliency"]).all()
