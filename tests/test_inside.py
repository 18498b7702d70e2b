import threading

import torch

from lafq.inside import OBSERVED, activation_trace


def test_concurrent_traces_on_one_shared_model_do_not_mix(tiny_model):
    """The app serves several requests on one model: each trace must see only its own forwards."""
    results, errors = {}, []

    def work(steps):
        try:
            for _ in range(3):
                results[steps] = activation_trace(tiny_model, 3, steps=steps)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(s,)) for s in (5, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[5].matrix.shape == (len(OBSERVED), 5) and results[7].matrix.shape == (len(OBSERVED), 7)
    assert all(not m._forward_hooks for m in tiny_model.modules())


def test_trace_is_deterministic(tiny_model):
    a = activation_trace(tiny_model, 1, steps=3, seed=2)
    b = activation_trace(tiny_model, 1, steps=3, seed=2)
    assert torch.equal(a.matrix, b.matrix) and a.timesteps == b.timesteps and a.timesteps[-1] == 0
