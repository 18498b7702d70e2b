import json

import torch

from lafq.diffusion import linear_schedule
from lafq.model import UNet
from lafq.train import TrainConfig, diffusion_loss, lr_at, train
from tests.conftest import TINY


def _fixed_batch_loss(model):
    g = torch.Generator().manual_seed(123)
    from lafq.data import load_dataset
    x, y = load_dataset("mnist-test10k").tensors()
    idx = torch.randint(len(x), (256,), generator=g)
    t = torch.randint(0, 1000, (256,), generator=g)
    noise = torch.randn(256, 1, 28, 28, generator=g)
    with torch.no_grad():
        return diffusion_loss(model.eval(), linear_schedule(), x[idx], y[idx], t, noise).item()


def test_a_few_steps_lower_the_loss(tmp_path):
    from lafq.checkpoint import load_unet
    torch.manual_seed(0)
    before = _fixed_batch_loss(UNet(TINY))
    cfg = TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup=5, log_every=20, save_every=60, sample_every=10**9,
                      ema_decay=0.5)
    train(tmp_path, cfg, TINY, progress=False, channels_last=False)
    model, meta = load_unet(tmp_path / "unet.safetensors")
    assert meta["train"]["steps"] == 60 and meta["train"]["dataset"] == "mnist-test10k"
    assert _fixed_batch_loss(model) < 0.7 * before
    from lafq.card import ModelCard
    card = ModelCard.read(tmp_path)  # written beside the model, as the CLI and the app read it
    assert (card.name, card.dataset, card.reference, card.null_class) == ("MNIST U-Net (lafq)", "mnist-test10k",
                                                                          "mnist-train5k", 10)
    assert card.classes == tuple(str(d) for d in range(10)) and card.guidance == 1.5


def test_resume_is_exact(tmp_path):
    cfg = TrainConfig(steps=12, batch_size=8, warmup=2, log_every=4, save_every=4, sample_every=10**9)
    train(tmp_path / "a", cfg, TINY, progress=False, until=6)
    train(tmp_path / "a", cfg, TINY, progress=False)
    train(tmp_path / "b", cfg, TINY, progress=False)
    from lafq.checkpoint import load_file
    a, _ = load_file(tmp_path / "a" / "train_state.safetensors")
    b, _ = load_file(tmp_path / "b" / "train_state.safetensors")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng"))


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=1000, warmup=100, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) < lr_at(99, cfg) == 1e-3
    assert lr_at(999, cfg) < lr_at(500, cfg) < 1e-3
    assert abs(lr_at(1000, cfg) - 1e-4) < 1e-9


def test_a_resumed_run_drops_the_log_lines_it_will_write_again(tmp_path):
    """Killed after logging step 300 and before the checkpoint at step 200's successor: steps 201-300 are
    trained again, so their lines (and a line cut short by the kill) go."""
    from lafq.train import trim_log

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (100, 200, 300)) + '{"step": 4')
    trim_log(log, 200)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [100, 200]
    trim_log(log, 0)  # a fresh run in the same folder starts an empty log
    assert log.read_text() == ""
