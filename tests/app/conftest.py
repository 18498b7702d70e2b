import pytest
import torch

from lafq.data import load_dataset
from lafq.fisher import compute_fisher
from lafq.model import UNet
from tests.conftest import TINY, unet_app_state


@pytest.fixture(scope="session")
def app_state():
    """The app's state around a tiny model, with a small per-digit Fisher map: fast handler tests."""
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    x, y = load_dataset("mnist-train5k").tensors()
    fm = compute_fisher(model, x[::10], y[::10], bins=4, samples_per_bin=4, per_class=True)
    return unet_app_state(model, fm)


def launch(state, models=None):
    """Serve the app for `state` (and a demo.models.Registry) on a free 127.0.0.1 port, the way app.py
    does; returns (demo, url)."""
    import socket

    from demo.ui import LAUNCH_OPTIONS, QUEUE_OPTIONS, build_app

    demo = build_app(state, models)
    demo.queue(**QUEUE_OPTIONS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS)
    return demo, f"http://127.0.0.1:{port}/"


TINY_INFO = {"name": "Tiny UNet2DModel (test)", "dataset": None, "classes": ["circle", "square"], "null_class": 2,
             "guidance": 1.5}


def tiny_diffusers_dir(root):
    """A class-conditional diffusers pipeline folder like checkpoints/fashion, at 8x8: the tiny UNet2DModel
    (3 class embeddings: two classes and the null class), its lafq.json and a small Fisher map of its weights."""
    import json

    from lafq.fisher import fisher_map
    from lafq.models.diffusers_models import load_diffusers, with_class_conditioning
    from tests.diffusers_tiny import save_pipeline_dir, tiny_unet2d

    save_pipeline_dir(root, tiny_unet2d())
    (root / "model_index.json").unlink()  # the shipped folder's contract: unet/ and scheduler/ only
    (root / "lafq.json").write_text(json.dumps(TINY_INFO))
    den = load_diffusers(root, subfolder="unet")
    den = with_class_conditioning(den, TINY_INFO["null_class"])
    images = torch.rand(16, *den.sample_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fisher_map(den, images, bins=3, samples_per_bin=2).save(root / "fisher.safetensors")
    return root


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tiny_diffusers_dir(tmp_path_factory.mktemp("tiny-diffusers"))


@pytest.fixture(scope="session")
def models(app_state, tiny_dir):
    """The registry the app builds from LAFQ_MODELS naming the tiny diffusers folder (no Fashion-MNIST folder)."""
    from demo.models import Registry, discover

    return Registry(app_state, discover({"LAFQ_MODELS": str(tiny_dir)}, shipped=()))


@pytest.fixture(scope="module")
def models_url(app_state, tiny_dir):
    """The app as app.py builds it (the registry from the environment), with LAFQ_MODELS naming the tiny folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAFQ_MODELS", str(tiny_dir))
        demo, url = launch(app_state)
    yield url
    demo.close()
