import shutil

import numpy as np
import pytest

from lafq import data
from lafq.data import MD5, REPO_DATA, DataError, load_dataset, load_dataset_or_subset, md5sum

TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # official MNIST test split


def test_vendored_files_match_their_checksums():
    for name, md5 in MD5.items():
        (path,) = REPO_DATA.rglob(name)
        assert md5sum(path) == md5


def test_the_vendored_fashion_subset_is_500_images_per_class_of_the_training_split():
    d = load_dataset("fashion-train5k")
    assert d.images.shape == (5000, 28, 28) and d.images.dtype == np.uint8
    assert np.bincount(d.labels).tolist() == [500] * 10
    assert len({img.tobytes() for img in d.images}) == 5000


def _debian_fashion(folder):
    """A stand-in for Debian's dataset-fashion-mnist files: 3 images of the vendored subset as IDX files."""
    import gzip

    d = load_dataset("fashion-train5k")
    folder.mkdir()
    for split in ("train", "t10k"):
        images = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28)) + d.images[:3].tobytes()
        labels = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + d.labels[:3].astype(np.uint8).tobytes()
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


def test_debians_fashion_files_are_read_unless_system_data_is_hidden(tmp_path, monkeypatch):
    _debian_fashion(tmp_path / "fashion-mnist")
    monkeypatch.setattr(data, "DEBIAN_FASHION", tmp_path / "fashion-mnist")
    monkeypatch.setenv(data.SYSTEM_DATA_ENV, "1")
    assert len(load_dataset("fashion-test")) == 3
    assert load_dataset_or_subset("fashion-train").name == "fashion-train"
    monkeypatch.setenv(data.SYSTEM_DATA_ENV, "0")
    with pytest.raises(DataError, match="hidden: LAFQ_SYSTEM_DATA=0"):
        load_dataset("fashion-test")


def test_offline_the_full_fashion_split_is_replaced_by_its_vendored_subset_and_named_so():
    d = load_dataset_or_subset("fashion-train")
    assert d.name == "fashion-train5k" and len(d) == 5000
    with pytest.raises(DataError, match="fashion-test"):  # no subset of the test split ships
        load_dataset_or_subset("fashion-test")


def test_test_split_shapes_and_label_counts():
    d = load_dataset("mnist-test10k")
    assert d.images.shape == (10000, 28, 28) and d.images.dtype == np.uint8
    assert np.bincount(d.labels).tolist() == TEST_COUNTS
    x, y = d.tensors()
    assert x.shape == (10000, 1, 28, 28) and -1 <= x.min() < x.max() <= 1


def test_train_subset_is_balanced_and_disjoint_from_test():
    d = load_dataset("mnist-train5k")
    assert d.images.shape == (5000, 28, 28)
    assert np.bincount(d.labels).tolist() == [500] * 10
    test = {img.tobytes() for img in load_dataset("mnist-test10k").images}
    assert not any(img.tobytes() in test for img in d.images)


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing data file .*t10k-images"):
        load_dataset("mnist-test10k", root=tmp_path)
    (tmp_path / "mnist").mkdir()
    for f in (REPO_DATA / "mnist").iterdir():
        shutil.copy(f, tmp_path / "mnist" / f.name)
    p = tmp_path / "mnist" / "mnist_train_subset_5k.npz"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="corrupt data file .*mnist_train_subset_5k.npz.*md5"):
        load_dataset("mnist-train5k", root=tmp_path)


def test_unknown_and_unreachable_datasets_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="mnist-test10k"):
        load_dataset("mnist-train", root=tmp_path, download=False)
