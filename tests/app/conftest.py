import pytest
import torch

from demo.state import AppState
from lafq.data import load_dataset
from lafq.fisher import compute_fisher
from lafq.model import UNet
from tests.conftest import TINY


@pytest.fixture(scope="session")
def app_state():
    """The app's state around a tiny model, with a small per-digit Fisher map: fast handler tests."""
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    x, y = load_dataset("mnist-train5k").tensors()
    fm = compute_fisher(model, x[::10], y[::10], bins=4, samples_per_bin=4, per_class=True)
    return AppState(model=model, fisher=fm, fisher_note="test map")


def launch(state):
    """Serve the app for `state` on a free 127.0.0.1 port, the way app.py does; returns (demo, url)."""
    import socket

    from demo.ui import LAUNCH_OPTIONS, QUEUE_OPTIONS, build_app

    demo = build_app(state)
    demo.queue(**QUEUE_OPTIONS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS)
    return demo, f"http://127.0.0.1:{port}/"
