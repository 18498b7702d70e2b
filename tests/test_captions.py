"""Text-to-image Fisher maps from the command line: `fisher --images LATENTS --captions FILE` on a pipeline folder
with a tokenizer and a text encoder (a tiny Stable-Diffusion-style folder built from configs, offline)."""
import json

import pytest
import torch

from lafq.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from tests.diffusers_tiny import sd_pipeline

    return sd_pipeline(tmp_path_factory.mktemp("sd"))


def run(folder, tmp_path, *extra) -> int:
    return main(["fisher", "--model", str(folder), "--images", str(folder / "latents.safetensors"), "--bins", "2",
                 "--samples", "3", "--out", str(tmp_path / "f.safetensors"), *extra])


def fisher(folder, tmp_path, *extra):
    from lafq.fisher import FisherMap

    assert run(folder, tmp_path, *extra) == 0
    return FisherMap.load(tmp_path / "f.safetensors")


def test_captions_condition_each_image_on_its_own_encoded_caption(sd_folder, tmp_path, capsys):
    from lafq.fisher import fisher_map
    from lafq.models import encode_captions, load

    fm = fisher(sd_folder, tmp_path, "--captions", str(sd_folder / "captions.txt"))
    assert torch.isfinite(fm.fisher).all() and (fm.fisher > 0).any() and fm.meta["captions"].endswith("captions.txt")
    # The same map in Python: the folder's text encoder, caption i as row i, the empty caption as the null row.
    cond = encode_captions(sd_folder, ["a red cat", "a blue dog", "photo of a cat", "a dog"])
    assert cond.rows == 5 and cond.kwargs["encoder_hidden_states"].shape == (5, 5, 6)
    den = load(sd_folder).with_conditioning(cond, null_row=4)
    latents = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = fisher_map(den, latents, labels=torch.arange(4), bins=2, samples_per_bin=3)
    assert torch.allclose(fm.fisher, ref.fisher, rtol=1e-5, atol=0)
    (tmp_path / "other.json").write_text(json.dumps(["a blue dog", "a red cat", "a cat", "photo"]))
    other = fisher(sd_folder, tmp_path, "--captions", str(tmp_path / "other.json"))
    assert not torch.allclose(other.fisher, fm.fisher)  # the captions are what the map is conditioned on


@pytest.mark.parametrize("setup, message", [
    (lambda f, t: (t / "c.txt").write_text("one\ntwo\n"), "has 2 captions for 4 images"),
    (lambda f, t: (t / "c.txt").write_bytes(b"\xff\xfe"), "is not UTF-8 text"),
    (lambda f, t: (t / "c.txt").write_text(""), "has no captions"),
])
def test_bad_captions_get_one_error_line(sd_folder, tmp_path, capsys, setup, message):
    setup(sd_folder, tmp_path)
    assert run(sd_folder, tmp_path, "--captions", str(tmp_path / "c.txt")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_pipeline_with_a_second_text_encoder_is_refused_in_one_line(sd_folder, tmp_path, capsys):
    import shutil

    two = tmp_path / "two"
    shutil.copytree(sd_folder, two)
    shutil.copytree(sd_folder / "text_encoder", two / "text_encoder_2")
    assert run(two, tmp_path, "--captions", str(sd_folder / "captions.txt")) == 2
    err = capsys.readouterr().err
    assert "has text_encoder_2/: captions are encoded for pipelines with one text encoder" in err and "Traceback" not in err


def test_captions_need_images_and_a_folder_with_a_text_encoder(sd_folder, tmp_path, capsys):
    import shutil

    assert main(["fisher", "--model", str(sd_folder), "--dataset", "mnist-test10k", "--captions",
                 str(sd_folder / "captions.txt")]) == 2
    assert "--captions goes with --images" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(sd_folder, bare, ignore=shutil.ignore_patterns("text_encoder"))
    assert run(bare, tmp_path, "--captions", str(sd_folder / "captions.txt")) == 2
    assert "has no text_encoder/: captions need a text-to-image pipeline folder" in capsys.readouterr().err
