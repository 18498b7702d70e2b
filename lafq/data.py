"""MNIST and Fashion-MNIST as uint8 arrays: vendored files offline, torchvision where a network exists.

Datasets by name (images uint8 (N, 28, 28), labels int64 (N,)):

    mnist-test10k   official MNIST test split, vendored in data/mnist (offline training set)
    mnist-train5k   500 per class of the MNIST training split, vendored (offline FID reference;
                    disjoint from mnist-test10k)
    mnist-train     the full 60k training split via torchvision (needs a network or a torchvision cache)
    fashion-train5k 500 per class of the Fashion-MNIST training split, vendored in data/fashion (what the app
                    and the tests read: the full split is too large to ship)
    fashion-train, fashion-test
                    Fashion-MNIST from Debian's dataset-fashion-mnist files or torchvision

Where a caller can do with a vendored subset of a split that is not installed (the app's Fisher recomputes and
real-vs-real floors), `load_dataset_or_subset` reads it instead (`SUBSETS`); the Dataset's `name` says which
was read, and callers show that name. `LAFQ_SYSTEM_DATA=0` hides every source outside the repo (Debian's
/usr/share/datasets, torchvision's cache or download, and torch hub's Inception weights: lafq.metrics), so a
machine with them can check what a fresh one sees (the test suite and scripts/fresh_check.sh set it).
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO_DATA = Path(__file__).resolve().parent.parent / "data"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

# md5 of the vendored files, from ../shared/data/README.md and checked on load.
MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "mnist_train_subset_5k.npz": "11def57eb666ead6d8efa9a9ff9c2218",
    "fashion_train_subset_5k.npz": "db430ec8f629bbabf2d64a13712e7f46",
}

DATASETS = ("mnist-test10k", "mnist-train5k", "mnist-train", "fashion-train5k", "fashion-train", "fashion-test")
# A split too large to ship -> its vendored subset (same split, so still disjoint from the split's reference).
SUBSETS = {"fashion-train": "fashion-train5k"}
SYSTEM_DATA_ENV = "LAFQ_SYSTEM_DATA"


def system_data_allowed(environ=None) -> bool:
    """False when LAFQ_SYSTEM_DATA=0: read only the files the repo vendors."""
    return (os.environ if environ is None else environ).get(SYSTEM_DATA_ENV, "1").strip() != "0"
OFFLINE_TRAIN = "mnist-test10k"
OFFLINE_REFERENCE = "mnist-train5k"


class DataError(RuntimeError):
    """A dataset could not be found or failed its checks; the message says where we looked and what to do."""


@dataclass(frozen=True)
class Dataset:
    name: str
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # int64 (N,)
    source: str  # where it was read from

    def __len__(self):
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float (N, 1, 28, 28) in [-1, 1], labels as long."""
        x = torch.from_numpy(self.images).float().div(127.5).sub(1).unsqueeze(1)
        return x, torch.from_numpy(self.labels).long()


def md5sum(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _checked(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    want = MD5.get(path.name)
    if want and md5sum(path) != want:
        raise DataError(f"corrupt data file {path}: md5 {md5sum(path)} != expected {want}; restore it from git "
                        f"(git checkout -- {path.name}) or ../shared/data/mnist")
    return path


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the format of the original MNIST distribution."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims).copy()  # frombuffer is read-only


def _idx_pair(images: Path, labels: Path, name: str) -> Dataset:
    x, y = read_idx(images), read_idx(labels).astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return Dataset(name, x, y, str(images.parent))


def _torchvision(name: str, root: Path, train: bool, fashion: bool, download: bool) -> Dataset:
    from torchvision import datasets

    cls = datasets.FashionMNIST if fashion else datasets.MNIST
    ds = cls(str(root), train=train, download=download)
    return Dataset(name, ds.data.numpy(), ds.targets.numpy().astype(np.int64), str(root))


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    """Load a dataset by name (see module docstring); raises DataError with the paths tried."""
    root = Path(root) if root else REPO_DATA
    tried: list[str] = []
    if name == "mnist-test10k":
        d = root / "mnist"
        return _idx_pair(_checked(d / "t10k-images-idx3-ubyte.gz"), _checked(d / "t10k-labels-idx1-ubyte.gz"), name)
    if name in ("mnist-train5k", "fashion-train5k"):
        family = name.split("-")[0]
        path = _checked(root / family / f"{family}_train_subset_5k.npz")
        with np.load(path) as z:
            return Dataset(name, z["images"].astype(np.uint8), z["labels"].astype(np.int64), str(path))
    system = system_data_allowed()
    if name.startswith("fashion-") and not system:
        tried.append(f"{DEBIAN_FASHION} (hidden: {SYSTEM_DATA_ENV}=0)")
    elif name.startswith("fashion-"):
        train = name == "fashion-train"
        prefix = "train" if train else "t10k"
        deb = [DEBIAN_FASHION / f"{prefix}-images-idx3-ubyte.gz", DEBIAN_FASHION / f"{prefix}-labels-idx1-ubyte.gz"]
        if all(p.is_file() for p in deb):
            return _idx_pair(deb[0], deb[1], name)
        tried += [str(p) for p in deb]
    if name in ("mnist-train", "fashion-train", "fashion-test"):
        tv_root = root / "torchvision"
        if not system:
            tried.append(f"torchvision in {tv_root} (hidden: {SYSTEM_DATA_ENV}=0)")
        else:
            try:
                return _torchvision(name, tv_root, train=name.endswith("train"), fashion=name.startswith("fashion"),
                                    download=download)
            except Exception as e:  # torchvision raises RuntimeError / URLError offline
                tried.append(f"torchvision cache/download in {tv_root} ({type(e).__name__}: {e})")
        hint = ("install Debian's dataset-fashion-mnist package, or use the vendored 'fashion-train5k'"
                if name.startswith("fashion") else f"use {OFFLINE_TRAIN!r} offline, or run once with a network")
        raise DataError(f"could not load {name!r}; tried: " + "; ".join(tried) + f". To get it: {hint}")
    raise DataError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def load_dataset_or_subset(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """`name`, or where it cannot be loaded here its vendored subset (SUBSETS; the result's name says so).
    Never downloads: this is for the app and other callers that must work offline."""
    try:
        return load_dataset(name, root, download=False)
    except DataError:
        if name not in SUBSETS:
            raise
        return load_dataset(SUBSETS[name], root)
