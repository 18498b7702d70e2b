import sys

import numpy as np
import pytest
import torch

from lafq.metrics import FIDResult, frechet_distance, mean_ci95, statistics


def test_identical_features_give_zero_and_shifts_grow():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2000, 16))
    base = statistics(f)
    assert frechet_distance(base, statistics(f.copy())) == pytest.approx(0, abs=1e-6)
    d = [frechet_distance(base, statistics(f + s)) for s in (0.1, 0.5, 1.0)]
    assert d[0] < d[1] < d[2]
    assert d[2] == pytest.approx(16 * 1.0, rel=1e-3)  # a pure mean shift adds |shift|^2 per dimension


def test_fid_survives_a_scipy_whose_sqrtm_takes_no_disp(monkeypatch):
    """pytorch-fid 0.3.0 calls sqrtm(..., disp=False); SciPy versions without `disp` get the same number."""
    import scipy.linalg

    rng = np.random.default_rng(1)
    a, b = statistics(rng.normal(size=(500, 8))), statistics(rng.normal(0.3, 1.2, size=(500, 8)))
    expected = frechet_distance(a, b)
    sqrtm = scipy.linalg.sqrtm

    def sqrtm_without_disp(m, **kw):
        if "disp" in kw:
            raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")
        return sqrtm(m, **kw)
    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_without_disp)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


def test_mean_and_ci95():
    m, ci = mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(4.303 * 1 / 3 ** 0.5, rel=1e-3)
    assert mean_ci95([5.0]) == (5.0, 0.0)


def test_fid_result_always_names_backend_and_n():
    r = FIDResult("classifier", 500, [3.0, 3.2, 2.8], accuracy=[0.9, 0.95, 1.0])
    s = r.describe()
    assert "backend=classifier" in s and "N=500" in s and "3 seeds" in s and "95.00%" in s


def test_shipped_classifier_features_and_accuracy():
    from lafq.classifier import load_classifier
    from lafq.data import load_dataset
    from lafq.metrics import ClassifierBackend, classifier_accuracy

    clf, meta = load_classifier("checkpoints/classifier.safetensors")
    d = load_dataset("mnist-train5k")
    images, labels = torch.from_numpy(d.images[:500]), torch.from_numpy(d.labels[:500])
    assert classifier_accuracy(clf, images, labels) > 0.97
    feats = ClassifierBackend(clf).features(images)
    assert feats.shape == (500, 128) and np.isfinite(feats).all()


def test_inception_backend_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    from lafq.metrics import InceptionBackend, get_backend

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("LAFQ_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="--backend classifier"):
        InceptionBackend()
    assert get_backend("auto").name == "classifier"


def test_fidelity_of_identical_images_is_perfect_and_of_a_known_shift_exact():
    from lafq.classifier import load_classifier
    from lafq.data import load_dataset
    from lafq.metrics import DEFAULT_CLASSIFIER, PSNR_CAP, fidelity

    clf = load_classifier(DEFAULT_CLASSIFIER)[0]
    ref = torch.from_numpy(load_dataset("mnist-test10k").images[:50])
    same = fidelity(ref, ref.clone(), clf)
    assert same.mad == 0 and same.psnr == PSNR_CAP and same.feature_distance == 0 and same.agreement == 1
    shifted = (ref.int() + 51).clamp(max=255).to(torch.uint8)  # +0.2 of the range where it does not clip
    f = fidelity(ref, shifted, clf)
    expected = float((shifted.double() - ref.double()).abs().mean() / 255)
    assert f.mad == pytest.approx(expected) and 0 < f.mad <= 0.2
    mse = float((shifted.double() - ref.double()).pow(2).mean())
    assert f.psnr == pytest.approx(10 * np.log10(255 ** 2 / mse))
    other = torch.from_numpy(load_dataset("mnist-test10k").images[50:100])
    far = fidelity(ref, other, clf)  # different digits: far in features, mostly other classes
    assert far.feature_distance > f.feature_distance and far.agreement < 0.5
    with pytest.raises(ValueError, match="one to one"):
        fidelity(ref, other[:10], clf)


def test_without_pytorch_fid_auto_picks_the_classifier_and_fid_is_the_same_number(monkeypatch):
    from lafq.metrics import InceptionBackend, get_backend

    rng = np.random.default_rng(0)
    a, b = statistics(rng.normal(size=(200, 8))), statistics(rng.normal(0.3, 1.2, size=(200, 8)))
    with_library = frechet_distance(a, b)
    for mod in ("pytorch_fid", "pytorch_fid.fid_score", "pytorch_fid.inception"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    assert frechet_distance(a, b) == pytest.approx(with_library, rel=1e-9)
    assert get_backend("auto").name == "classifier"
    with pytest.raises(ValueError, match="the Inception backend needs pytorch-fid"):
        InceptionBackend()


def test_cached_inception_weights_count_as_system_data_and_are_hidden_with_it(tmp_path, monkeypatch):
    pytest.importorskip("pytorch_fid")
    from pytorch_fid.inception import FID_WEIGHTS_URL

    from lafq.metrics import inception_weights_path

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("LAFQ_INCEPTION_WEIGHTS", raising=False)
    cached = tmp_path / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[-1]
    cached.parent.mkdir()
    cached.write_bytes(b"weights")
    monkeypatch.setenv("LAFQ_SYSTEM_DATA", "1")
    assert inception_weights_path() == cached
    monkeypatch.setenv("LAFQ_SYSTEM_DATA", "0")  # as the test suite runs: the weights in torch hub's cache are hidden
    assert inception_weights_path() is None
