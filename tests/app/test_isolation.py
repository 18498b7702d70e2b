"""Several gradio_client users at once: one user's Fisher recompute, cancel or burst never reaches another."""
import threading

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from demo import tab_quality  # noqa: E402
from demo.state import _hooked  # noqa: E402
from tests.app.conftest import launch  # noqa: E402

GLOBAL = ["global", "fp16", "final", -2, -10, 0, 0, 0.25, 0, 6, False]  # Fisher-dependent: moves with the map
INT8 = ["uniform", "int8", "final", -2, -10, 0, 0, 0.25, 0, 6, False]
WAIT = 300  # seconds before a wait counts as a hang (a failure bound, not a timing threshold)


@pytest.fixture(scope="module")
def url(app_state):
    demo, url = launch(app_state)
    yield url
    demo.close()


def started_signal(monkeypatch, module, name):
    """Patch module.name (quick_fisher / evaluate_fid) so that its first progress call sets an Event."""
    started = threading.Event()
    real = getattr(module, name)

    def wrapped(*args, progress=None, **kwargs):
        def signal(*a, **k):
            started.set()
            if progress is not None:
                progress(*a, **k)
        return real(*args, progress=signal, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
    return started


def heavy_slot_frees(app_state) -> bool:
    """True once no heavy job computes any more (the worker thread released the slot)."""
    if app_state.heavy.acquire(timeout=WAIT):
        app_state.heavy.release()
        return True
    return False


def test_a_recompute_never_breaks_or_changes_other_users(url, app_state, monkeypatch):
    shipped = app_state.fisher
    from demo import state as demo_state

    started = started_signal(monkeypatch, demo_state, "quick_fisher")
    g, b = Client(url, verbose=False), Client(url, verbose=False)
    before_b = b.predict(*GLOBAL, api_name="/quantize_readout")[0]
    job = g.submit(100, 256, False, api_name="/recompute_fisher")  # long: it runs while the others work
    assert started.wait(WAIT)
    assert not _hooked(app_state.model)  # the recompute's hooks are on a private copy
    errors = []

    def use(readout):  # one client per thread: each is a user with a session of their own
        try:
            user = Client(url, verbose=False)
            user.predict(*readout, api_name="/quantize_readout")  # INT8: a plan first built during the recompute
            user.predict("7", 1.5, 2, 0, 2, True, api_name="/compare")
            user.predict("7", 2, 0, api_name="/quant_error")
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))
    threads = [threading.Thread(target=use, args=(r,)) for r in (INT8, GLOBAL, INT8, GLOBAL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert errors == []
    assert not _hooked(app_state.model)
    job.cancel()
    assert heavy_slot_frees(app_state)  # the cancelled recompute stopped computing
    assert app_state.fisher is shipped and not _hooked(app_state.model)
    fresh = Client(url, verbose=False)  # a new user of the plan built during the recompute
    fresh.predict(*INT8, api_name="/quantize_readout")
    fresh.predict("3", 1.5, 2, 0, 2, True, api_name="/compare")
    fresh.predict("3", 2, 0, api_name="/quant_error")
    # G's own completed recompute changes G's plans only.
    monkeypatch.undo()
    before_g = g.predict(*GLOBAL, api_name="/quantize_readout")[0]
    g.predict(1, 4, False, api_name="/recompute_fisher")  # one bin: used to fail after replacing everyone's map
    after_g = g.predict(*GLOBAL, api_name="/quantize_readout")[0]
    assert b.predict(*GLOBAL, api_name="/quantize_readout")[0] == before_b
    assert app_state.fisher is shipped and after_g != before_g
    g.predict(api_name="/shipped_fisher")
    assert g.predict(*GLOBAL, api_name="/quantize_readout")[0] == before_g


def test_cancelling_from_an_api_client_stops_the_server_job(url, app_state, monkeypatch):
    started = started_signal(monkeypatch, tab_quality, "evaluate_fid")
    cached = dict(app_state.fid_cache)
    client = Client(url, verbose=False)
    job = client.submit(2000, 200, 5, True, api_name="/fid")  # the largest job the app accepts
    assert started.wait(WAIT)
    job.cancel()
    assert heavy_slot_frees(app_state)  # the worker stopped at its next step instead of running for an hour
    assert dict(app_state.fid_cache) == cached  # and recorded nothing
    md, _ = Client(url, verbose=False).predict(20, 2, 1, False, api_name="/fid")  # the slot serves the next user
    assert "N=20" in md


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_memory_comes_back_after_a_burst_of_heavy_jobs(url, app_state):
    client = Client(url, verbose=False)
    client.predict(100, 2, 1, True, api_name="/fid")  # warm: classifier, reference statistics, import-time memory
    start = rss_bytes()
    clients = [Client(url, verbose=False) for _ in range(3)]
    jobs = [c.submit(100, 3 + i, 2, True, api_name="/fid") for i, c in enumerate(clients)]  # new settings: no cache
    jobs += [c.submit("any", 1.5, 3, i, 16, True, api_name="/compare") for i, c in enumerate(clients)]
    for j in jobs:
        j.result(WAIT)
    assert heavy_slot_frees(app_state)
    assert rss_bytes() <= 1.2 * start, (start, rss_bytes())
