"""A built Space folder boots on its own: `python app.py` there, offline, with the environment a Space sets and
only the packages its own requirements.txt installs (tests/requirements_view.py): every model it ships is
selected and compared."""
import os

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from lafq import space  # noqa: E402
from tests.app.boot import free_port, serving  # noqa: E402
from tests.requirements_view import View, view  # noqa: E402


def space_env(home) -> dict:
    """What a Space sets, offline; nothing from this repo on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPACES_ZERO_GPU", "LAFQ_DEVICE",
                                                             "LAFQ_MODELS")}
    return {**env, "SYSTEM": "spaces", "SPACE_ID": "someone/lafq", "GRADIO_SERVER_NAME": "0.0.0.0",
            "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False"}


@pytest.fixture(scope="module", params=sorted(space.HARDWARE))
def booted(request, tmp_path_factory):
    if request.param == "zero-gpu":
        pytest.importorskip("spaces")  # the real package: off ZeroGPU its decorator returns the function
    out = tmp_path_factory.mktemp("boot") / request.param
    space.build(out, request.param)
    site = view(out / "requirements.txt", tmp_path_factory.mktemp("site-packages"))
    env = site.env(space_env(tmp_path_factory.mktemp("home")))
    with serving(View.python() + ["app.py"], out, env, free_port(), f"app.py in the {request.param} Space") as (url, log):
        yield request.param, out, url, log


def test_a_built_space_serves_its_page_offline(booted):
    import urllib.request

    hardware, out, url, _ = booted
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.status == 200


def test_a_built_space_answers_a_compare_call_for_each_model_it_ships(booted):
    hardware, out, url, log = booted
    assert (out / "checkpoints" / "fashion" / "lafq.json").is_file()  # the project ships it, so the Space does
    client = Client(url, verbose=False)
    for model_id in ("mnist", "fashion"):
        client.predict(model_id, api_name="/select_model")
        fp32, plan, uniform, _diff, timing = client.predict("0", 1.5, 2, 0, 1, True, api_name="/compare")
        assert fp32 and plan and uniform and "mean |Δ| to FP32" in timing, model_id
    assert "0.0.0.0" in "".join(log)  # served on every interface, as a Space must
