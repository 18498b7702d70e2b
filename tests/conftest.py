import os
import shutil

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Every test (and every process a test starts) reads data from the repo only, as on a fresh machine: a dataset
# installed by hand here (Debian's dataset-fashion-mnist, a torchvision cache) must not make a test pass.
os.environ["LAFQ_SYSTEM_DATA"] = "0"

from lafq.checkpoint import save_unet  # noqa: E402
from lafq.model import UNet, UNetConfig  # noqa: E402

TINY = UNetConfig(base_channels=8, channel_mults=(1, 1, 2), attn_heads=2, groups=4, dropout=0.0)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(int(os.environ.get("LAFQ_TEST_THREADS", "1")))  # 1: no oversubscription beside other jobs


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return UNet(TINY).eval()


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_model):
    """A tiny U-Net file in a folder laid out as `train` and the shipped checkpoints/ are: the model card beside
    it (the shipped U-Net's: MNIST classes and datasets), and links to the shipped classifier and statistics."""
    from lafq import paths

    path = tmp_path / "tiny.safetensors"
    save_unet(path, tiny_model, train={"steps": 0})
    shutil.copy(paths.CHECKPOINTS / "lafq.json", tmp_path)
    (tmp_path / "classifier.safetensors").symlink_to(paths.CLASSIFIER)
    (tmp_path / "stats").symlink_to(paths.STATS, target_is_directory=True)
    return path


def unet_app_state(model, fisher, note: str = "test map", device: str = "cpu"):
    """The app's state around a lafq U-Net as the shipped one is served: its adapter, the shipped card
    (checkpoints/lafq.json), classifier and statistics, the project's report."""
    from demo.state import AppState
    from lafq import paths
    from lafq.card import ModelCard
    from lafq.models import from_lafq_unet

    return AppState(from_lafq_unet(model), ModelCard.read(paths.CHECKPOINTS), fisher, note, folder=paths.CHECKPOINTS,
                    report_dir=paths.DOCS, device=device)
