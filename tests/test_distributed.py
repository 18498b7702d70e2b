"""torchrun data parallelism: two gloo processes on the CPU give the one-process Fisher map."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from lafq.fisher import FisherMap, compute_fisher


def _torchrun(args, cwd, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "lafq", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# Both runs score one sample per backward pass (--chunk 1) on one thread, so every sample's squared gradient is
# the same float32 tensor in both; only the order differs in which a bin's n nonnegative terms are summed (in
# float32 within a process, then float64), which moves a sum by at most (n-1)*2^-24 of itself in each order.
# The float64 means over a tensor's elements add under 1e-11 (≤ 1e4 elements of the tiny models x 2^-53 each);
# ATOL covers float32 subnormal squares, whose rounding is absolute (2^-149), not relative.
SAMPLES = 5
RTOL = 2 * (SAMPLES - 1) * 2.0 ** -24 + 1e-11  # 4.8e-7, on any CPU
ATOL = 1e-40


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _same_map(a: FisherMap, b: FisherMap):
    assert a.names == b.names and a.bin_edges == b.bin_edges and a.groups == b.groups
    assert (a.fisher > 1e-12).sum() > 0.5 * a.fisher.numel()
    torch.testing.assert_close(a.fisher, b.fisher, rtol=RTOL, atol=ATOL)
    for k in a.channel:
        torch.testing.assert_close(a.channel[k], b.channel[k], rtol=RTOL, atol=ATOL)


def test_torchrun_with_two_gloo_processes_gives_the_one_process_fisher_map(tiny_ckpt, tmp_path):
    out = tmp_path / "two.safetensors"
    # 5 samples per bin: an uneven split (3 + 2) between the processes; per-class and the null class too.
    r = _torchrun(["fisher", "--checkpoint", str(tiny_ckpt), "--dataset", "mnist-train5k", "--bins", "2", "--samples",
                   str(SAMPLES), "--per-class", "--chunk", "1", "--device", "cpu", "--out", str(out), "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)  # rank 0 alone reports (one JSON document on stdout)
    assert res["processes"] == 2
    two = FisherMap.load(out)
    assert two.meta["processes"] == 2

    from lafq.data import load_dataset
    from lafq.pipeline import load_denoiser
    model, _ = load_denoiser(tiny_ckpt)
    x, y = load_dataset("mnist-train5k").tensors()
    with one_thread():  # as each torchrun process (OMP_NUM_THREADS=1)
        one = compute_fisher(model, x, y, bins=2, samples_per_bin=SAMPLES, per_class=True, chunk=1)
    assert one.meta["processes"] == 1
    _same_map(one, two)


def test_torchrun_shards_the_fisher_map_of_a_diffusers_model_too(tmp_path):
    from safetensors.torch import load_file, save_file

    from lafq.fisher import fisher_map
    from lafq.models import capture_conditioning, load_conditioning, load_diffusers, save_conditioning
    from tests.diffusers_tiny import save_pipeline_dir, tiny_unet2d

    model = tiny_unet2d()
    root = save_pipeline_dir(tmp_path / "pipe", model, "v_prediction")
    cond = capture_conditioning(model, lambda: model(torch.randn(3, 1, 8, 8), timestep=torch.tensor([1, 2, 3]),
                                                     class_labels=torch.tensor([0, 1, 2])))
    save_conditioning(tmp_path / "cond.safetensors", cond)
    torch.manual_seed(0)
    save_file({"images": torch.randn(6, 1, 8, 8)}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "two.safetensors"
    r = _torchrun(["fisher", "--model", str(root), "--images", str(tmp_path / "x.safetensors"), "--conditioning",
                   str(tmp_path / "cond.safetensors"), "--bins", "2", "--samples", str(SAMPLES), "--chunk", "1",
                   "--device", "cpu", "--out", str(out), "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    den = load_diffusers(str(root), conditioning=load_conditioning(tmp_path / "cond.safetensors"))
    with one_thread():
        one = fisher_map(den, load_file(str(tmp_path / "x.safetensors"))["images"], bins=2, samples_per_bin=SAMPLES,
                         chunk=1)
    _same_map(one, FisherMap.load(out))
