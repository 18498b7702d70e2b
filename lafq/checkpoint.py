"""Safetensors files with LAFQ metadata: the only format models are loaded from (no pickle).

Every file carries one metadata key, `lafq`, holding JSON:
    {"format": 1, "kind": "unet" | "classifier" | "quantized" | "train_state" | "fisher", ...}
Writes go to a temporary file in the target directory, then rename: never a half-written file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

FORMAT = 1
KINDS = ("unet", "classifier", "quantized", "train_state", "fisher", "conditioning", "activation-ranges")


def state_digest(model: torch.nn.Module) -> str:
    """Short hash of a model's weights: ties a Fisher map, cached statistics and evaluation records to the
    checkpoint they were computed on."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        _digest_value(h, v)
    return h.hexdigest()[:16]


def _digest_value(h, v) -> None:
    """Float tensors by their values (quantized ones dequantized); the packed (tensor, ...) tuples and dtype
    entries of torch.ao's int8 modules (the integer compute modes) by their parts."""
    if torch.is_tensor(v):
        v = v.dequantize() if v.is_quantized else v
        h.update(v.detach().float().cpu().numpy().tobytes())
    elif isinstance(v, (tuple, list)):
        for part in v:
            _digest_value(h, part)
    else:
        h.update(repr(v).encode())


class CheckpointError(ValueError):
    """A file is not a valid LAFQ safetensors file, or does not fit the model it is loaded into."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename. OSErrors name `path`
    (not the temporary file): "is a directory: out", "permission denied: out/x.png"."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except (FileExistsError, NotADirectoryError):  # mkdir met a file where a folder belongs
        raise NotADirectoryError(errno.ENOTDIR, "A parent folder is a file", str(path)) from None
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shipped files must be readable by all
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sweep_stale(path)


STALE_SECONDS = 3600  # a temporary file this old is no writer's: a process killed (kill -9) mid-write left it


def _sweep_stale(path: Path) -> None:
    """Delete temporary files of earlier writes of `path` that a killed process left behind."""
    import glob
    import time

    now = time.time()
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - p.stat().st_mtime > STALE_SECONDS:
                p.unlink()
        except OSError:  # gone already, or not ours to delete: the write itself succeeded
            pass


def save_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Save tensors with `meta` (JSON-serialisable) under the `lafq` metadata key, atomically."""
    meta = {"format": FORMAT, **meta}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata={"lafq": json.dumps(meta, sort_keys=True)}))


def read_bytes_checked(data: bytes, name: str = "<bytes>", kind: str | None = None) -> tuple[dict, dict]:
    """Parse safetensors bytes; return (tensors, lafq metadata). Raises CheckpointError on anything odd."""
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError, TypeError, KeyError) as e:  # TypeError/KeyError: a dtype torch lacks
        raise CheckpointError(f"{name} is not a valid .safetensors file ({str(e)[:100]}); only .safetensors files made by "
                              f"lafq are accepted (pickled .pt/.pth/.ckpt files are refused by design)") from None
    # safetensors.torch.load drops metadata; read the header for it (8-byte length, then JSON).
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    raw = header.get("__metadata__", {}).get("lafq")
    if raw is None:
        raise CheckpointError(f"{name} has no 'lafq' metadata: it was not written by lafq")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{name}: the 'lafq' metadata is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{name}: the 'lafq' metadata must be a JSON object, got a {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{name}: format {str(meta.get('format'))[:20]!r} is not supported "
                              f"(this lafq reads format {FORMAT})")
    if meta.get("kind") not in KINDS:
        raise CheckpointError(f"{name}: kind {str(meta.get('kind'))[:20]!r} is unknown; lafq writes {', '.join(KINDS)}")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{name} holds a {meta.get('kind')!r}, expected a {kind!r}")
    return tensors, meta


def load_file(path: str | os.PathLike, kind: str | None = None) -> tuple[dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}" if not path.exists() else f"{path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:  # permission denied, I/O error: one line, not a traceback
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    return read_bytes_checked(data, str(path), kind)


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
    if problems:
        raise CheckpointError(f"{name} does not fit the model: " + "; ".join(problems))


def config_mismatch(expected: dict, found: dict) -> list[str]:
    """Human-readable differences between two config dicts."""
    keys = sorted(set(expected) | set(found))
    return [f"{k}: expected {expected.get(k)!r}, file has {found.get(k)!r}" for k in keys if expected.get(k) != found.get(k)]


def save_unet(path, model, train: dict | None = None) -> None:
    meta = {"kind": "unet", "config": model.cfg.to_dict(), "train": train or {}}
    save_file(path, model.state_dict(), meta)


def unet_from_file(tensors: dict, meta: dict, name: str, expect_config=None):
    """Build a UNet from loaded tensors and metadata, validating config and tensors."""
    from .model import UNet, UNetConfig, to_inference_layout

    try:
        cfg = UNetConfig.from_dict(meta.get("config", {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: invalid config in metadata ({e})") from None
    if expect_config is not None and cfg != expect_config:
        diff = config_mismatch(expect_config.to_dict(), cfg.to_dict())
        raise CheckpointError(f"{name}: config does not match: " + "; ".join(diff))
    model = UNet(cfg)
    check_state_dict(model, tensors, name)
    model.load_state_dict(tensors)
    return to_inference_layout(model.eval())


def load_unet(path, expect_config=None):
    """Load a U-Net (returns (model in eval mode, metadata)); raises CheckpointError with what is wrong."""
    tensors, meta = load_file(path, kind="unet")
    return unet_from_file(tensors, meta, str(path), expect_config), meta
