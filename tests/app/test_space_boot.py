"""A built Space folder boots on its own: `python app.py` there, offline, with the environment a Space sets."""
import os
import queue
import socket
import subprocess
import sys
import threading

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from lafq import space  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def space_env(port: int, home) -> dict:
    """What a Space sets, offline; nothing from this repo on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPACES_ZERO_GPU", "LAFQ_DEVICE")}
    return {**env, "SYSTEM": "spaces", "SPACE_ID": "someone/lafq", "GRADIO_SERVER_NAME": "0.0.0.0",
            "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
            "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module", params=sorted(space.HARDWARE))
def booted(request, tmp_path_factory):
    if request.param == "zero-gpu":
        pytest.importorskip("spaces")  # the real package: off ZeroGPU its decorator returns the function
    out = tmp_path_factory.mktemp("boot") / request.param
    space.build(out, request.param)
    port = free_port()
    p = subprocess.Popen([sys.executable, "app.py"], cwd=out, env=space_env(port, tmp_path_factory.mktemp("home")),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout] + [lines.put(None)], daemon=True).start()
    seen = []
    try:
        while True:  # gradio prints its URL once the server accepts connections
            line = lines.get(timeout=300)
            if line is None:
                pytest.fail(f"app.py in the {request.param} Space exited with {p.wait()}:\n{''.join(seen)}")
            seen.append(line)
            if "Running on local URL" in line:
                break
        yield request.param, out, f"http://127.0.0.1:{port}/", seen
    finally:
        p.terminate()
        p.wait(timeout=60)


def test_a_built_space_serves_its_page_offline(booted):
    import urllib.request

    hardware, out, url, _ = booted
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.status == 200


def test_a_built_space_answers_a_compare_call(booted):
    hardware, out, url, log = booted
    client = Client(url, verbose=False)
    fp32, plan, uniform, _diff, timing = client.predict("7", 1.5, 2, 0, 1, True, api_name="/compare")
    assert fp32 and plan and uniform and "ms/image" in timing
    assert "0.0.0.0" in "".join(log)  # served on every interface, as a Space must
