import pytest
import torch

from lafq.checkpoint import CheckpointError, load_unet, save_unet
from lafq.model import UNet, UNetConfig
from tests.conftest import TINY


def test_round_trip_keeps_weights_config_and_facts(tiny_ckpt, tiny_model):
    model, meta = load_unet(tiny_ckpt)
    assert model.cfg == TINY
    assert meta["train"] == {"steps": 0}
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_config_mismatch_names_the_fields(tiny_ckpt):
    other = UNetConfig(base_channels=16, channel_mults=(1, 1, 2), attn_heads=2, groups=4, dropout=0.0)
    with pytest.raises(CheckpointError, match="base_channels: expected 16, file has 8"):
        load_unet(tiny_ckpt, expect_config=other)


def test_pickle_and_garbage_are_refused(tmp_path, tiny_model):
    pt = tmp_path / "model.pt"
    torch.save(tiny_model.state_dict(), pt)
    with pytest.raises(CheckpointError, match="not a valid .safetensors"):
        load_unet(pt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError):
        load_unet(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        load_unet(tmp_path / "absent.safetensors")


def test_tensors_that_do_not_fit_are_listed(tmp_path, tiny_model):
    from lafq.checkpoint import save_file
    state = dict(tiny_model.state_dict())
    state.pop("head.2.bias")
    state["stem.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(path, state, {"kind": "unet", "config": TINY.to_dict()})
    with pytest.raises(CheckpointError, match=r"missing 1 tensors.*head\.2\.bias.*shape mismatches"):
        load_unet(path)


def test_save_is_atomic_on_failure(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_unet(path, tiny_model)
    before = path.read_bytes()
    import lafq.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck.os, "fsync", boom)
    with pytest.raises(OSError):
        save_unet(path, UNet(TINY))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_a_write_deletes_the_temporary_files_that_killed_writers_left_hours_ago(tmp_path):
    import os
    import time

    from lafq.checkpoint import STALE_SECONDS, atomic_write_bytes

    stale, fresh = tmp_path / ".x.bin.a1b2c3.tmp", tmp_path / ".x.bin.d4e5f6.tmp"
    stale.write_bytes(b"half"), fresh.write_bytes(b"being written")
    old = time.time() - STALE_SECONDS - 60
    os.utime(stale, (old, old))
    atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert (tmp_path / "x.bin").read_bytes() == b"data"
    assert not stale.exists() and fresh.exists()  # a write in progress elsewhere is not touched
