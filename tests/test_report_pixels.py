"""`report --model DIR` on a model that ships no classifier: a tiny text-to-image pipeline (cross-attention U-Net,
CLIP text encoder, built offline) measured by pixel fidelity to FP32 only, conditioned on a caption list."""
import csv

import pytest

from lafq.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    from tests.diffusers_tiny import sd_pipeline

    folder = sd_pipeline(tmp_path_factory.mktemp("sd"))
    caps = str(folder / "captions.txt")
    assert main(["fisher", "--model", str(folder), "--images", str(folder / "latents.safetensors"), "--captions",
                 caps, "--bins", "2", "--samples", "3", "--out", str(folder / "fisher.safetensors"), "--json"]) == 0
    args = ["report", "--model", str(folder), "--captions", caps, "--quick", "--n", "4", "--steps", "2", "--seeds",
            "2", "--random-seeds", "2", "--sensitivity-precisions", "int8,int4-g32", "--json"]
    assert main(args) == 0
    return folder, args


def test_a_text_to_image_pipeline_without_a_classifier_gets_the_full_report_in_pixel_fidelity(reported):
    folder, _ = reported
    text = (folder / "report" / "report.md").read_text()
    rows = list(csv.DictReader(open(folder / "report" / "report.csv")))
    names = {r["name"] for r in rows}
    # The same grid as for any model: FP32, the first/last-layer recipes at conv_in / conv_out, budgets, controls.
    assert {"fp32", "int4, int8 stem+head", "budget @ int4-g32 size", "uniform int4-g32"} <= names
    assert "`conv_in`, `conv_out`" in text
    assert all(float(r["mad"]) >= 0 and float(r["psnr"]) > 0 for r in rows)
    assert all(r["fid"] == "" and r["feature_distance"] == "" and r["agreement"] == "" for r in rows)
    assert "No classifier ships with this model" in text and "caption-balanced (4 captions" in text
    assert "nan" not in text and "Traceback" not in text
    header = next(line for line in text.splitlines() if line.startswith("| plan | bytes |"))
    assert "mean abs Δ" in header and "PSNR" in header  # measured ...
    assert "FID" not in header and "agreement" not in header and "feature" not in header  # ... not shown as zero
    assert "Δ mean abs Δ" in text and "ΔFID" not in text.split("## What the data say")[1].split("## Random")[0]
    # The sensitivity validation: each layer alone at INT4, ρ against mean |Δ| (no feature distance without features).
    sens = text.split("## Sensitivity validation")[1]
    assert "| predictor | ρ vs mean abs Δ |" in sens and "feature distance" not in sens.split("|---|")[0]
    assert (folder / "report" / "sensitivity.csv").is_file() and (folder / "report" / "report_pareto.svg").is_file()
    # ... and at the other precisions budget plans use: each layer alone at INT8 and at INT4-g32 too.
    others = sens.split("At the other precisions")[1]
    assert "| INT8 | 10 |" in others and "| INT4-G32 | 10 |" in others
    precisions = {r["precision"] for r in csv.DictReader(open(folder / "report" / "sensitivity.csv"))}
    assert precisions == {"int4", "int8", "int4-g32"}


def test_a_rerun_of_the_pixel_report_samples_nothing_and_gives_the_same_records(reported, capsys):
    folder, args = reported
    before = (folder / "report" / "report.csv").read_bytes()
    capsys.readouterr()
    assert main([*args, "--render"]) == 0
    assert (folder / "report" / "report.csv").read_bytes() == before


def test_a_text_to_image_report_without_captions_or_a_fisher_map_is_one_error_line(reported, tmp_path, capsys):
    folder, _ = reported
    assert main(["report", "--model", str(folder), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["report", "--model", str(folder), "--captions", str(folder / "captions.txt"), "--fisher",
                 str(tmp_path / "none.safetensors"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "no Fisher map at" in err and "python -m lafq fisher --model" in err


def test_other_captions_are_other_records_not_a_reuse_of_the_first_captions_samples(reported, tmp_path):
    from lafq.evaluate import Evaluator
    from lafq.models import encode_captions, load
    from lafq.pipeline import SampleSpec

    folder, _ = reported
    a = load(folder).with_conditioning(encode_captions(folder, ["a red cat", "a dog"]), null_row=2)
    b = load(folder).with_conditioning(encode_captions(folder, ["a blue dog", "a cat"]), null_row=2)
    spec = SampleSpec(n=2, steps=2)
    ka, kb = (Evaluator(d, None, None, tmp_path)._key("pixels", None, spec) for d in (a, b))
    assert ka != kb
    assert Evaluator(a, None, None, tmp_path)._key("pixels", None, spec) == ka  # and the same captions, the same key
