"""The README's app command on a fresh machine (`pip install -r requirements.txt && python app.py`), checked
without installing: the code runs under an interpreter that sees only requirements.txt's packages
(tests/requirements_view.py), so an import of anything else (diffusers, torchao, quanto, transformers, ...)
fails here as it would there. Every module of lafq/ and demo/ imports, and app.py serves every model it lists:
each one is selected and compared through the API, with hostile LAFQ_MODELS entries beside them skipped."""
import os
import subprocess

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from lafq import paths  # noqa: E402
from tests.app.boot import free_port, serving  # noqa: E402
from tests.requirements_view import View, view  # noqa: E402

REPO = paths.REPO


@pytest.fixture(scope="module")
def only_requirements(tmp_path_factory) -> View:
    return view(REPO / "requirements.txt", tmp_path_factory.mktemp("site-packages"))


def modules() -> list[str]:
    """Every module of lafq/ and demo/, subpackages included (listed from the files: nothing imported here)."""
    out = []
    for pkg in ("lafq", "demo"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] != "__main__" and "__pycache__" not in parts:
                out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_requirements_txt_leaves_out_what_the_app_does_not_need(only_requirements):
    # The view is narrower than this machine: the test tools and the optional export libraries stay out.
    assert "diffusers" in only_requirements.names and not only_requirements.missing
    assert {"pytest", "selenium", "torchao", "optimum-quanto"}.isdisjoint(only_requirements.names)


def test_every_module_of_the_library_and_the_app_imports_with_only_requirements_txt(only_requirements):
    assert {"lafq.models.diffusers_models", "demo.tab_compare", "lafq.fisher"} <= set(modules())
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run(View.python() + ["-c", script, "app", *modules()], cwd=REPO, env=only_requirements.env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def app_url(only_requirements, tiny_dir, tmp_path_factory):
    from tests.app.test_models import _hostile_folders

    # LAFQ_MODELS names folders that once stopped the app from starting: each is skipped with a log line.
    hostile = _hostile_folders(tiny_dir, tmp_path_factory.mktemp("hostile"))
    env = only_requirements.env({**os.environ, "LAFQ_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
                                 "LAFQ_MODELS": os.pathsep.join(map(str, hostile.values()))})
    with serving(View.python() + ["app.py"], REPO, env, free_port(), "app.py under requirements.txt") as (url, log):
        yield url, log, len(hostile)


def test_every_model_the_app_lists_is_selected_and_compared_with_only_requirements_txt(app_url):
    from demo.models import discover

    url, log, hostile = app_url
    assert sum("LAFQ_MODELS entry" in line and "skipped" in line for line in log) == hostile
    ids = [e.id for e in discover({})]
    assert ids[:2] == ["mnist", "fashion"]  # the shipped models; a checkout without checkpoints/fashion fails here
    client = Client(url, verbose=False)
    for model_id in [*ids, ids[0]]:
        client.predict(model_id, api_name="/select_model")
        fp32, plan, uniform, _diff, timing = client.predict("0", 1.5, 2, 0, 1, True, api_name="/compare")
        assert fp32 and plan and uniform and "mean |Δ| to FP32" in timing, model_id
