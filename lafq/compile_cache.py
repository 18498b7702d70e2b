"""torch.compile without paying the compile wait in every process: a persistent project cache.

Contract:
    cache_root()        $LAFQ_CACHE_DIR, else $XDG_CACHE_HOME/lafq, else ~/.cache/lafq (never in the repository)
    enable()            points TorchInductor's on-disk caches at cache_root()/inductor (unless the user set
                        TORCHINDUCTOR_CACHE_DIR) and makes sure its FX-graph and AOT-autograd caches are on;
                        call before the first compilation of the process. Returns the directory used.
    compile_model(m)    enable(), then torch.compile(m, **kw): the first process compiles and writes the
                        caches, later processes (same torch, same model code, same shapes) load them.

How torch 2.14 behaves (read from torch/_inductor/config.py, torch/_functorch/config.py,
torch/_inductor/runtime/cache_dir_utils.py and torch/compiler/__init__.py): the FX-graph cache
(`fx_graph_cache`, env TORCHINDUCTOR_FX_GRAPH_CACHE) and the AOT-autograd cache (`enable_autograd_cache`,
env TORCHINDUCTOR_AUTOGRAD_CACHE) are on by default, but write under /tmp/torchinductor_$USER, which a
reboot or a fresh container empties. `cache_dir()` reads TORCHINDUCTOR_CACHE_DIR at its first call and
then pins it in the environment, hence "call enable() before compiling". Dynamo's tracing is not
cached: a warm process still traces the model (seconds), then loads the compiled graphs.
`torch.compiler.save_cache_artifacts()` / `load_cache_artifacts()` serialise the same two caches
(833 KB for this model) into bytes for moving them to another machine; `export_artifacts` /
`import_artifacts` below wrap them for that case. Measured on the 2-core VM, DDIM-5 at batch 64
(docs/benchmark-runs.md, `python -m lafq bench --only compile`): a first process compiles for 46-100 s,
a second one starts compiled with a few seconds of overhead.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("LAFQ_CACHE_DIR"):
        return Path(os.environ["LAFQ_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lafq"


def enable() -> Path:
    """Persistent inductor caches under cache_root()/inductor; a user's TORCHINDUCTOR_CACHE_DIR wins."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return path


def compile_model(model, **kw):
    """torch.compile with the persistent caches on; same arguments as torch.compile."""
    import torch

    enable()
    return torch.compile(model, **kw)


def export_artifacts(path: str | os.PathLike) -> int:
    """Write what this process compiled (torch.compiler.save_cache_artifacts) to `path`; returns bytes written (0: nothing)."""
    import torch

    from .checkpoint import atomic_write_bytes

    got = torch.compiler.save_cache_artifacts()
    if got is None:
        return 0
    atomic_write_bytes(path, got[0])
    return len(got[0])


def import_artifacts(path: str | os.PathLike) -> bool:
    """Load artifacts written by export_artifacts into this process's caches, before compiling; False if absent."""
    import torch

    p = Path(path)
    if not p.exists():
        return False
    enable()
    return torch.compiler.load_cache_artifacts(p.read_bytes()) is not None
