import shutil

import numpy as np
import pytest

from lafq.data import MD5, REPO_DATA, DataError, load_dataset, md5sum

TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # official MNIST test split


def test_vendored_files_match_their_checksums():
    for name, md5 in MD5.items():
        assert md5sum(REPO_DATA / "mnist" / name) == md5


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
