"""torchrun data parallelism: two gloo processes on the CPU give the one-process Fisher map."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from lafq.fisher import FisherMap, compute_fisher


def _torchrun(args, cwd, nproc=2, env=None):
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "lafq", "--", *args]  # "--": torchrun would read lafq's --n as its own (ambiguous) option
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


VOLATILE = {"seconds", "machine", "device"}  # where and how long: the rest of a record is the measurement


def _records(cache) -> dict:
    out = {}
    for p in sorted(cache.rglob("*.json")):
        rec = json.loads(p.read_text())
        out[str(p.relative_to(cache))] = {k: v for k, v in rec.items() if k not in VOLATILE}
    return out


def _one_process(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "lafq", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_report_grid_and_fid_split_over_two_gloo_ranks_give_the_one_process_records_and_resume_after_a_rank_dies(
        tiny_ckpt, tmp_path):
    fisher = tmp_path / "f.safetensors"
    r = _one_process(["fisher", "--checkpoint", str(tiny_ckpt), "--dataset", "mnist-train5k", "--bins", "2",
                      "--samples", "3", "--device", "cpu", "--out", str(fisher), "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]

    def report(tag):
        return ["report", "--checkpoint", str(tiny_ckpt), "--fisher", str(fisher), "--quick", "--n", "4", "--steps", "2",
                "--seeds", "2", "--random-seeds", "1", "--backend", "classifier", "--device", "cpu",
                "--cache-dir", str(tmp_path / tag / "cache"), "--out-dir", str(tmp_path / tag / "out"), "--json"]
    r = _one_process(report("one"), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    one = _records(tmp_path / "one" / "cache")
    assert len([k for k in one if "sensitivity" in k]) > 4 and len(one) > 30

    # Rank 1 dies after its third record (as a killed process would); torchrun stops the run.
    env = {**os.environ, "LAFQ_FAULT": "1:3"}
    died = _torchrun(report("two"), tmp_path, env=env)
    assert died.returncode != 0
    partial = _records(tmp_path / "two" / "cache")
    assert 3 <= len(partial) < len(one), died.stderr[-2000:]
    assert all(one[k] == v for k, v in partial.items() if k in one)  # nothing half-written, nothing different
    # The rerun resumes from what is on disk and finishes: the same records as one process, the report by rank 0.
    r = _torchrun(report("two"), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["records"] == json.loads(
        _one_process([*report("one"), "--render"], tmp_path).stdout.strip().splitlines()[-1])["records"]
    assert _records(tmp_path / "two" / "cache") == one
    assert (tmp_path / "two" / "out" / "report.md").read_text().count("| budget") > 2
    assert "Partial" not in (tmp_path / "two" / "out" / "report.md").read_text()

    def fid(tag):
        return ["fid", "--model", str(tiny_ckpt), "--n", "8", "--steps", "2", "--seeds", "3", "--backend", "classifier",
                "--device", "cpu", "--cache-dir", str(tmp_path / tag), "--json"]
    a, b = _one_process(fid("fid-one"), tmp_path), _torchrun(fid("fid-two"), tmp_path)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-1500:], b.stderr[-1500:])
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)  # rank 0 alone reports
    assert ra["fid_values"] == rb["fid_values"] and len(rb["fid_values"]) == 3
    per_seed = {k: v for k, v in _records(tmp_path / "fid-two").items() if k.startswith("fid-")}
    assert per_seed == {k: v for k, v in _records(tmp_path / "fid-one").items() if k.startswith("fid-")}
