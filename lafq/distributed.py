"""Data-parallel scoring on torch.distributed: `torchrun --nproc_per_node K -m lafq fisher | report | fid ...`.

`report` and `fid` split their resumable records instead (lafq.evaluate.Evaluator.shard; fid: seed i to rank
i mod K): each rank writes its finished records atomically into the shared cache directory, and rank 0 renders
from what is on disk after a barrier. A rank that dies loses only its unfinished record; a rerun resumes.

Contract: every process draws the same random samples (one generator, one seed), scores only its
shard of them (sample i goes to process i mod K), and the partial float64 sums are all-reduced at
the end, so the result equals the one-process result to float32 rounding (each process sums its
share of the float32 squared gradients first). Rank 0
writes the output; the others write nothing. gloo on the CPU, NCCL on GPUs (one per process,
`LOCAL_RANK`). Without torchrun (no WORLD_SIZE, or WORLD_SIZE 1) everything here is a no-op: one
process, shard = everything.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device | str = "cpu") -> torch.device:
    """Join the process group torchrun describes (if any) and return this process's device:
    `cuda:LOCAL_RANK` when `device` is a GPU, else `device` unchanged."""
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return device
    if not torch.distributed.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run one process")
    # Ranks wait at barriers for the slowest one's share (a resumed report: one rank redoing its lost records while
    # the others are done), which can take hours; torch's defaults (10 min NCCL, 30 min gloo) would abort the run.
    # A rank that dies still ends the run at once: torchrun stops the others.
    timeout = timedelta(hours=24)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        torch.distributed.init_process_group("gloo", timeout=timeout)
    return device


def shard(n: int) -> slice:
    """This process's samples out of n drawn by every process."""
    return slice(rank(), n, world())


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """In place: every process ends with the sum over processes (no-op in one process). NCCL
    reduces on the GPU, so CPU tensors go there and back."""
    if not active():
        return
    gpu = torch.distributed.get_backend() == "nccl"
    for t in tensors:
        if gpu:
            d = t.cuda()
            torch.distributed.all_reduce(d)
            t.copy_(d.cpu())
        else:
            torch.distributed.all_reduce(t)


def barrier() -> None:
    if active():
        torch.distributed.barrier()


FAULT_ENV = "LAFQ_FAULT"  # "RANK:K": that rank exits (status 3) after finishing its K-th record (tests of resuming)
_faults = {"done": 0}


def fault_point() -> None:
    """Called after each finished record: with LAFQ_FAULT=RANK:K in the environment, rank RANK dies right after its
    K-th one, as a killed process would (os._exit: no cleanup, no barrier). For tests of resuming; unset, nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _faults["done"] += 1
    r, k = (int(v) for v in spec.split(":"))
    if rank() == r and _faults["done"] >= k:
        os._exit(3)


def finish() -> None:
    if active():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
