"""demo/zerogpu.py: a no-op off ZeroGPU; on ZeroGPU, handlers run in a forked worker and their results come back."""
import multiprocessing
import pickle

import pytest

from demo import zerogpu
from demo.state import InputError
from tests.conftest import unet_app_state


def plain(state, x):
    return x


def test_off_zerogpu_the_decorator_returns_the_function_itself():
    assert not zerogpu.ON_ZEROGPU
    assert zerogpu.gpu(duration=30)(plain) is plain
    assert zerogpu.host_device("auto") == "auto" and zerogpu.describe("cpu") == "cpu"


def test_the_app_handlers_are_unwrapped_off_zerogpu():
    from demo import tab_compare, tab_fisher, tab_inside, tab_quality

    for fn in (tab_compare.compare, tab_fisher.recompute, tab_quality.evaluate, tab_inside.activations,
               tab_inside.saliency_panels, tab_inside.quant_error, tab_inside.drift):
        assert not hasattr(fn, "__wrapped__"), fn.__name__


def test_the_real_spaces_decorator_is_a_no_op_off_zerogpu():
    spaces = pytest.importorskip("spaces")
    assert spaces.GPU(duration=30)(plain) is plain and spaces.GPU(plain) is plain


def forking_gpu(durations: list):
    """A stand-in for spaces.GPU on ZeroGPU: arguments and results are pickled and the task runs in a forked
    process, so anything the task changes in the app's memory is lost unless it is returned."""
    def GPU(duration=None):
        def deco(task):
            def call(*args, **kwargs):
                durations.append(duration(*args, **kwargs) if callable(duration) else duration)
                payload = pickle.dumps((args, kwargs))
                ctx = multiprocessing.get_context("fork")
                recv, send = ctx.Pipe(duplex=False)

                def child():
                    a, k = pickle.loads(payload)
                    send.send_bytes(pickle.dumps(task(*a, **k)))
                p = ctx.Process(target=child)
                p.start()
                data = recv.recv_bytes()
                p.join()
                return pickle.loads(data)
            return call
        return deco
    return GPU


@pytest.fixture
def on_zerogpu(monkeypatch):
    monkeypatch.setattr(zerogpu, "WORKER_DEVICE", "cpu")  # the forked worker computes on the CPU here
    durations = []
    return (lambda fn, duration: zerogpu.wrap(fn, duration, forking_gpu(durations))), durations


@pytest.fixture
def state(app_state):
    return unet_app_state(app_state.model, app_state.fisher)  # own caches, same model


def test_compare_runs_in_the_worker_and_returns_its_images(on_zerogpu, state):
    from demo.tab_compare import compare

    wrap, durations = on_zerogpu
    fp32, plan, uniform, _fig, md = wrap(compare, 30)(state, None, "7", 1.5, 2, 0, 1, True)
    assert fp32.shape == plan.shape == uniform.shape and "mean |Δ| to FP32" in md
    assert durations == [30]


def test_a_fisher_map_recomputed_in_the_worker_comes_back_as_the_users_own(on_zerogpu, state):
    from demo.tab_fisher import recompute

    wrap, durations = on_zerogpu
    shared = state.fisher
    user, msg = wrap(recompute, zerogpu.fisher_seconds)(state, 3, 2, False, None, cancel=object())
    assert user.fisher.bins == 3 and user.fisher_note.startswith("your recomputed map: 3 bins") and "recomputed" in msg
    assert state.fisher is shared  # the shared map stays the app's, for every other user
    assert durations == [zerogpu.fisher_seconds(3, 2, False)]


def test_fid_results_from_the_worker_are_cached_in_the_app(on_zerogpu, state):
    from demo.tab_quality import evaluate

    wrap, durations = on_zerogpu
    md, _chart, user = wrap(evaluate, zerogpu.fid_seconds)(state, None, 10, 1, 1, False, None)
    fids = [k for k in state.fid_cache if k[0] != "images"]  # beside the images the fidelity line compares
    assert "N=10" in md and len(fids) == 1 and len(user.evaluations) == 1
    assert durations == [zerogpu.fid_seconds(None, 10, 1, 1, False)]


def test_a_bad_input_in_the_worker_keeps_its_one_line_message(on_zerogpu, state):
    from demo.tab_compare import compare

    wrap, _ = on_zerogpu
    with pytest.raises(InputError, match=r"images must be in \[1, 64\], got -5"):
        wrap(compare, 30)(state, None, "7", 1.5, 2, 0, -5, False)


def test_durations_grow_with_the_job_and_tolerate_bad_values():
    assert zerogpu.fisher_seconds(100, 256, True) > zerogpu.fisher_seconds(50, 16, False) >= 30
    assert zerogpu.fid_seconds(None, 2000, 200, 5, True) > zerogpu.fid_seconds(None, 200, 20, 2, True) >= 30
    assert zerogpu.fisher_seconds("many", None) >= 30
