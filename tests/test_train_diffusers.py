"""lafq.train_diffusers and `python -m lafq train-diffusers`: a tiny class-conditional UNet2DModel trains,
resumes exactly, and its folder loads with lafq.models.load_diffusers and samples with guidance."""
import json

import torch

from lafq.train import TrainConfig
from lafq.train_diffusers import UNet2DConfig, model_card, train_diffusers

TINY2D = UNet2DConfig(block_out_channels=(4, 8), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=2, attention_head_dim=4)
# The vendored Fashion-MNIST subset: every machine has it (the full splits are a Debian package or a download).
CFG = TrainConfig(dataset="fashion-train5k", steps=6, batch_size=4, warmup=2, log_every=2, save_every=3, sample_every=10**9)


def test_a_run_split_in_two_calls_ends_with_the_weights_of_one_uninterrupted_run(tmp_path):
    from lafq.checkpoint import load_file

    train_diffusers(tmp_path / "a", CFG, TINY2D, progress=False, until=3)
    train_diffusers(tmp_path / "a", CFG, TINY2D, progress=False)
    train_diffusers(tmp_path / "b", CFG, TINY2D, progress=False)
    a, meta = load_file(tmp_path / "a" / "train_state.safetensors")
    b, _ = load_file(tmp_path / "b" / "train_state.safetensors")
    assert meta["step"] == 6 and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng"))
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3, 4, 6]



def test_a_train_state_written_with_the_wrapped_unet_keys_still_resumes_exactly(tmp_path):
    """Train states written while the U-Net was trained inside a wrapper (keys `model.unet.*`, as the shipped
    checkpoints/fashion one) resume to the weights of an uninterrupted run."""
    from lafq.checkpoint import load_file, save_file

    train_diffusers(tmp_path / "a", CFG, TINY2D, progress=False, until=3)
    path = tmp_path / "a" / "train_state.safetensors"
    tensors, meta = load_file(path, kind="train_state")
    wrapped = {(f"{k.split('.', 1)[0]}.unet.{k.split('.', 1)[1]}" if k.split(".")[0] in ("model", "ema", "optim")
                else k): v for k, v in tensors.items()}
    save_file(path, wrapped, meta)
    train_diffusers(tmp_path / "a", CFG, TINY2D, progress=False)
    train_diffusers(tmp_path / "b", CFG, TINY2D, progress=False)
    a, _ = load_file(path)
    b, _ = load_file(tmp_path / "b" / "train_state.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng"))


def test_the_folder_loads_with_load_diffusers_and_samples_each_class_with_guidance(tmp_path):
    from lafq.models import Conditioning, load_diffusers

    train_diffusers(tmp_path, CFG, TINY2D, progress=False)
    assert (tmp_path / "samples.png").is_file()
    card = json.loads((tmp_path / "lafq.json").read_text())
    assert card["classes"][0] == "T-shirt/top" and len(card["classes"]) == 10
    assert (card["null_class"], card["guidance"], card["train"]["steps"]) == (10, 1.5, 6)
    den = load_diffusers(tmp_path)
    assert den.source["class"] == "UNet2DModel" and den.prediction_type == "epsilon"
    assert den.sample_shape == (1, 28, 28) and den.T == 1000
    den = den.with_conditioning(Conditioning({"class_labels": torch.arange(11)}, 11), null_row=10)
    x = den.sample(3, steps=2, rows=[0, 5, 9], guidance=1.5, seed=0)
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()
    assert torch.equal(x, den.sample(3, steps=2, rows=[0, 5, 9], guidance=1.5, seed=0))


def test_a_train_state_of_another_shape_is_refused_in_one_line(tmp_path):
    import pytest

    from lafq.checkpoint import CheckpointError

    train_diffusers(tmp_path, CFG, TINY2D, progress=False, until=1)
    with pytest.raises(CheckpointError, match="model config differs"):
        train_diffusers(tmp_path, CFG, UNet2DConfig(block_out_channels=(8, 8), down_block_types=TINY2D.down_block_types,
                                                    up_block_types=TINY2D.up_block_types, norm_num_groups=2,
                                                    attention_head_dim=4), progress=False)


def test_the_model_card_names_fashion_classes_and_the_null_class():
    card = model_card("fashion-train", 10)
    assert card == {"name": "Fashion-MNIST UNet2DModel (diffusers)", "dataset": "fashion-train",
                    "reference": "fashion-test", "classes": card["classes"], "null_class": 10, "guidance": 1.5}
    assert card["classes"][-1] == "Ankle boot"


def test_the_cli_trains_until_the_step_asked_and_rejects_until_past_steps(tmp_path, capsys):
    from lafq.cli import main

    out = tmp_path / "run"
    assert main(["train-diffusers", "--dataset", "fashion-train5k", "--out", str(out), "--steps", "4", "--until", "1",
                 "--batch-size", "2", "--threads", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 1 and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert main(["train-diffusers", "--out", str(out), "--steps", "4", "--until", "5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --until 5 is past --steps 4"


def test_a_dit_trains_resumes_exactly_and_its_folder_goes_through_fisher_plan_and_guided_samples(tmp_path):
    """`--arch dit`: a class-conditional DiTTransformer2DModel (adaLN-Zero, patch 4) in a transformer/ folder."""
    from lafq.checkpoint import load_file
    from lafq.fisher import classes_of, fisher_map
    from lafq.models import load
    from lafq.policy import Policy, make_plan
    from lafq.train_diffusers import DiTConfig

    tiny = DiTConfig(patch_size=4, num_layers=1, num_attention_heads=2, attention_head_dim=8)
    train_diffusers(tmp_path / "a", CFG, tiny, progress=False, until=3)
    train_diffusers(tmp_path / "a", CFG, tiny, progress=False)
    train_diffusers(tmp_path / "b", CFG, tiny, progress=False)
    a, meta = load_file(tmp_path / "a" / "train_state.safetensors")
    b, _ = load_file(tmp_path / "b" / "train_state.safetensors")
    assert meta["architecture"] == "DiTTransformer2DModel" and meta["step"] == 6
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng"))
    assert (tmp_path / "a" / "transformer" / "config.json").is_file()
    assert json.loads((tmp_path / "a" / "lafq.json").read_text())["name"].endswith("DiTTransformer2DModel (diffusers)")
    den = load(tmp_path / "a")  # lafq.json's null class: the DiT's own classifier-free label row
    assert den.source["class"] == "DiTTransformer2DModel" and den.null_row == 10 and classes_of(den) == list(range(10))
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    fm = fisher_map(den, x, labels=torch.arange(8), bins=2, samples_per_bin=2)
    plan = make_plan(Policy(strategy="budget", avg_bits=8.0, statistic="mean"), fm, dict(den.module.named_parameters()))
    assert set(plan.precisions) == set(fm.names)
    imgs = den.sample(2, steps=3, rows=[0, 1], guidance=1.5)
    assert imgs.shape == (2, 1, 28, 28) and torch.isfinite(imgs).all()
    import pytest
    with pytest.raises(Exception, match="DiTTransformer2DModel train state|not a UNet2DModel train state"):
        train_diffusers(tmp_path / "a", CFG, TINY2D, progress=False)
