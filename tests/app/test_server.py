"""The app behind a real local server, driven through gradio_client's named endpoints."""
import socket

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

READOUT = ["layer-ratio", "fp16", "final", -2, -10, 0, 0, 0.25, 0, 6, False]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app_state):
    from demo.ui import LAUNCH_OPTIONS, QUEUE_OPTIONS, build_app

    demo = build_app(app_state)
    demo.queue(**QUEUE_OPTIONS)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def test_named_endpoints_are_listed(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/quantize_readout", "/compare", "/fid", "/export", "/load_plan", "/recompute_fisher"} <= names


def test_quantize_readout(client):
    md, table, _fig = client.predict(*READOUT, api_name="/quantize_readout")
    assert "% of FP32" in md
    rows = table["data"] if isinstance(table, dict) else table
    assert {r[0] for r in rows} <= {"fp32", "fp16"}
    md_all, _, _ = client.predict(*["global", "fp16", "final", 0, -10, 0, 0, 0.25, 0, 6, False], api_name="/quantize_readout")
    assert "50.0% of FP32" in md_all


def test_compare_and_fid_quick(client):
    fp32, plan, uniform, _diff, timing = client.predict("7", 2.0, 2, 0, 2, True, api_name="/compare")
    assert all(p for p in (fp32, plan, uniform)) and "ms/image" in timing
    md, _chart = client.predict(20, 2, 2, False, api_name="/fid")
    assert "backend=classifier" in md and "N=20" in md


@pytest.mark.parametrize("args, api, message", [
    (["magic", *READOUT[1:]], "/quantize_readout", "strategy must be one of|not in the list of choices"),
    ([*READOUT[:7], "NaN", *READOUT[8:]], "/quantize_readout", "p must be in|Expected a `float`"),
    ([*READOUT[:7], 7.0, *READOUT[8:]], "/quantize_readout", "p must be in|greater than|less than"),
    (["7", 2.0, 2, 0, -5, False], "/compare", "images must be in|greater than|less than"),
    (["7", 2.0, 2, 0, 10**9, False], "/compare", "images must be in|greater than|less than"),
    ([10**9, 2, 2, False], "/fid", "N must be in|greater than|less than"),
])
def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(client, args, api, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name=api)
    md, _, _ = client.predict(*READOUT, api_name="/quantize_readout")
    assert "% of FP32" in md


def test_bad_upload_then_good_request(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(b"\x80\x04\x95 pickled stuff")
    with pytest.raises(AppError, match="not a valid .safetensors"):
        client.predict(handle_file(str(bad)), api_name="/load_plan")
    md, _, _ = client.predict(*READOUT, api_name="/quantize_readout")
    assert "% of FP32" in md


def test_app_refuses_a_bad_device_in_one_line():
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "app.py"], cwd=repo, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LAFQ_DEVICE": "tpu", "GRADIO_SERVER_PORT": str(free_port())})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown device 'tpu'; choose one of auto, cpu, cuda")


def test_header_names_the_device(app_state):
    from demo.ui import build_app

    assert "Computing on: cpu" in build_app(app_state).config["components"][0]["props"]["value"]
