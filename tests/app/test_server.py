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
    assert all(p for p in (fp32, plan, uniform)) and "mean |Δ| to FP32" in timing
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

    assert "computing on cpu" in build_app(app_state).config["components"][0]["props"]["value"]


def test_every_hostile_upload_gets_a_one_line_error_and_leaves_no_file(client, app_state, tmp_path):
    from pathlib import Path

    from gradio.utils import get_upload_folder
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from demo import tab_quantize
    from tests.app.hostile import hostile_files

    cur = tab_quantize.policy_from_controls("layer-ratio", "int8", "final", -2, -10, 0, 0, 0.5, 0, 6, False)
    model_path, _ = tab_quantize.export(app_state, cur, session="hostile-server")
    empties = lambda: {p for p in Path(get_upload_folder()).glob("tmp*") if p.is_file()}  # noqa: E731
    before = empties()
    for name, (data, message) in hostile_files(Path(model_path).read_bytes()).items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AppError) as e:
            client.predict(handle_file(str(tmp_path / name)), api_name="/load_plan")
        assert message in str(e.value) and "internal error" not in str(e.value), (name, str(e.value))
    md, _, _ = client.predict(*READOUT, api_name="/quantize_readout")  # still serving
    assert "% of FP32" in md
    left = {p.name for p in Path(get_upload_folder()).rglob("*") if p.is_file()}
    assert not left & set(hostile_files(Path(model_path).read_bytes()))  # refused uploads are deleted
    assert empties() == before  # and no empty temporary file per upload (Gradio's File made one)


def raw_post(server: str, path: str, headers: dict, body: bytes = b"") -> int:
    """An HTTP POST with exactly these headers (a Content-Length may promise more than is sent); the status code."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(server)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.putrequest("POST", path)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    if body:
        conn.send(body)
    status = conn.getresponse().status
    conn.close()
    return status


def test_oversized_bodies_and_cross_origin_uploads_are_refused_before_reaching_disk(server):
    big = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(200 * 2**20)}
    assert raw_post(server, "/gradio_api/upload", big) == 413  # answered before a byte of the body is read
    small = b'--x\r\nContent-Disposition: form-data; name="files"; filename="p.json"\r\n\r\n{}\r\n--x--\r\n'
    cross = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(len(small)),
             "Origin": "http://evil.example"}
    assert raw_post(server, "/gradio_api/upload", cross, small) == 403
    assert raw_post(server, "/gradio_api/upload", {**cross, "Origin": "null"}, small) == 403  # a local file's page
    same = {**cross, "Origin": server.rstrip("/")}
    assert raw_post(server, "/gradio_api/upload", same, small) == 200
    huge_json = {"Content-Type": "application/json", "Content-Length": str(10 * 2**20)}
    assert raw_post(server, "/gradio_api/queue/join", huge_json) == 413


def test_a_foreign_host_and_an_unknown_api_name_get_one_line_refusals(server, monkeypatch):
    import httpx

    r = httpx.get(server, headers={"Host": "evil.example"})  # DNS rebinding: another site's name for 127.0.0.1
    assert r.status_code == 421 and r.text.startswith("this server answers to localhost and 127.0.0.1 only (Host "
                                                      "'evil.example'); behind a reverse proxy")
    assert httpx.get(server, headers={"Host": "localhost"}).status_code == 200
    monkeypatch.setenv("LAFQ_ALLOWED_HOSTS", "demo.example.org")  # a reverse proxy that keeps the Host
    assert httpx.get(server, headers={"Host": "demo.example.org"}).status_code == 200
    r = httpx.post(server + "gradio_api/call/v2/quantize_readout", json={"data": []})  # the "Use via API" form
    assert r.status_code != 404
    for verb in ("call", "run", "call/v2"):
        r = httpx.post(server + f"gradio_api/{verb}/nosuch", json={"data": []})
        assert r.status_code == 404 and r.text.startswith("no API named 'nosuch'; this app has /activation_drift, /activations, /compare")
        assert "figures_inline" not in r.text  # the page's own events are not advertised


def test_gradio_defaults_that_leak_are_off(server, client):
    import httpx

    assert httpx.get(server + "gradio_api/monitoring/summary").status_code in (403, 404)
    assert httpx.get(server + "monitoring/summary").status_code in (403, 404)
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert names == {"/quantize_readout", "/compare", "/fid", "/export", "/load_plan", "/recompute_fisher",
                     "/shipped_fisher", "/activations", "/saliency", "/quant_error", "/activation_drift", "/select_model"}


def test_a_rejected_value_is_not_echoed_in_full(client):
    from gradio_client.exceptions import AppError

    for args, api in [(("7", 2.0, 2, 0, "9" * 5000, False), "/compare"),
                      (("x" * 5000, *READOUT[1:]), "/quantize_readout")]:
        with pytest.raises(AppError) as e:
            client.predict(*args, api_name=api)
        assert "9" * 300 not in str(e.value) and "x" * 300 not in str(e.value)


def test_each_export_replaces_the_sessions_previous_one(client):
    from pathlib import Path

    from demo.tab_quantize import EXPORTS

    before = {p for p in EXPORTS.root.iterdir()}
    client.predict(api_name="/export")
    client.predict(api_name="/export")
    assert len({p for p in EXPORTS.root.iterdir()} - before) == 1 and Path(EXPORTS.root).is_dir()


def test_each_figure_and_readout_follows_its_controls_through_one_event(app_state):
    """A preset sets up to 11 controls at once; one event per control could finish out of order and leave
    the readout of a half-applied preset. With one event per output, Gradio defers further triggers while
    it runs and then runs it once more with the final values ("always_last"), so the last result shown
    is the final one."""
    from collections import Counter

    from demo.ui import build_app

    config = build_app(app_state).config
    name = {c["id"]: c["props"].get("elem_id") or c["props"].get("label") for c in config["components"]}
    shows = {c["id"] for c in config["components"] if c["type"] in ("plot", "markdown", "dataframe")}
    on_change = [d for d in config["dependencies"] if any(t[1] == "change" for t in d["targets"])]
    writers = Counter(o for d in on_change for o in d["outputs"] if o in shows)
    assert {name[o] for o, n in writers.items() if n > 1} == set()
    readout = [d for d in on_change if any(name.get(o) == "size-readout" for o in d["outputs"])]
    assert len(readout) == 1 and readout[0]["trigger_mode"] == "always_last"
    assert len(readout[0]["targets"]) == 11  # every control of the Quantize tab


def test_a_long_evaluation_by_one_client_does_not_hold_up_another_clients_export(server, monkeypatch):
    import threading

    from demo import tab_quality

    started, release = threading.Event(), threading.Event()

    def slow_evaluate(st, cur, n, steps, seeds, fp32, *args, user=None, **kw):  # holds the heavy slot until released
        started.set()
        release.wait(timeout=600)
        return "stand-in evaluation", None, user

    monkeypatch.setattr(tab_quality, "evaluate", slow_evaluate)
    a, b = Client(server, verbose=False), Client(server, verbose=False)
    evaluation = a.submit(20, 2, 2, False, api_name="/fid")
    try:
        assert started.wait(timeout=300)
        # Were the export queued behind the evaluation, it could not finish before the evaluation is released.
        assert b.submit(api_name="/export").result(timeout=300)
        assert not evaluation.done()
    finally:
        release.set()
    assert evaluation.result(timeout=300)[0] == "stand-in evaluation"


def test_error_messages_never_show_the_servers_folders():
    import tempfile

    import gradio as gr

    from demo.ui import guard
    from lafq import paths
    from lafq.data import DataError

    def fails():
        raise DataError(f"missing data file {paths.REPO / 'data' / 'x.npz'}; upload kept in {tempfile.gettempdir()}/g/f")

    with pytest.raises(gr.Error) as e:
        guard(fails)()
    assert str(paths.REPO) not in e.value.message and tempfile.gettempdir() not in e.value.message
    assert "missing data file data/x.npz" in e.value.message


def test_a_cancelled_job_leaves_every_output_as_it_was_and_raises_no_error():
    import gradio as gr

    from demo.state import Cancelled
    from demo.ui import guard

    def cancelled():
        raise Cancelled("cancelled")

    assert guard(cancelled)() == gr.skip()
