"""`fisher --model --dataset` and `fid --model` on a tiny train-diffusers folder: labels become conditioning rows
(with the null class at the label-dropout rate), FID and accuracy per seed land in JSON, reference
statistics in the folder's stats cache."""
import json

import pytest
import torch

from lafq.train_diffusers import make_scheduler, model_card, save_pipeline
from tests.test_train_diffusers import TINY2D


@pytest.fixture
def folder(tmp_path):
    """An untrained tiny folder whose lafq.json names MNIST (small vendored splits) and a random classifier."""
    from lafq.classifier import ClassifierConfig, MnistClassifier, save_classifier

    torch.manual_seed(0)
    root = tmp_path / "model"
    save_pipeline(root, TINY2D.build().eval(), make_scheduler(), model_card("mnist-test10k", TINY2D.null_class))
    save_classifier(root / "classifier.safetensors", MnistClassifier(ClassifierConfig(width=4, feature_dim=8)).eval())
    return root


def _seen_labels(den, images, **kw):
    from lafq.fisher import fisher_map

    seen = []
    h = den.module.register_forward_pre_hook(lambda m, a, k: seen.append(k["class_labels"].clone()), with_kwargs=True)
    try:
        fisher_map(den, images, bins=2, samples_per_bin=4, **kw)
    finally:
        h.remove()
    return torch.cat(seen[1:])  # the first call counts module calls on one sample


def test_labels_condition_each_draw_on_its_image_label_and_p_null_one_on_the_null_class(folder):
    from lafq.models import Conditioning, load_diffusers

    den = load_diffusers(folder).with_conditioning(Conditioning({"class_labels": torch.arange(11)}, 11), null_row=10)
    images = torch.zeros(5, 1, 28, 28)
    assert set(_seen_labels(den, images, labels=torch.full((5,), 3), p_null=0.0).tolist()) == {3}
    assert set(_seen_labels(den, images, labels=torch.full((5,), 3), p_null=1.0).tolist()) == {10}
    with pytest.raises(ValueError, match="one row per image"):
        _seen_labels(den, images, labels=torch.zeros(4, dtype=torch.long))


def test_fisher_model_takes_a_dataset_and_records_the_label_dropout(folder, tmp_path, capsys):
    from lafq.cli import main
    from lafq.fisher import FisherMap

    out = tmp_path / "f.safetensors"
    assert main(["fisher", "--model", str(folder), "--dataset", "mnist-train5k", "--bins", "2", "--samples", "4",
                 "--device", "cpu", "--out", str(out), "--json"]) == 0
    fm = FisherMap.load(out)
    assert "p=0.1" in fm.meta["loss"] and fm.meta["images"] == "mnist-train5k"
    assert "unet.conv_in.weight" not in fm.names and "conv_in.weight" in fm.names
    assert main(["fisher", "--model", str(folder), "--dataset", "mnist-train5k", "--images", str(out), "--out",
                 str(out)]) == 2
    assert "give one of --images (clean samples) or --dataset" in capsys.readouterr().err
    assert main(["fisher-model", "--model", str(folder), "--bins", "1", "--samples", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err  # the old name still runs, after one line; the model card names the dataset
    assert err.splitlines()[0] == "note: `fisher-model` is deprecated: it is `fisher` (with --model)"
    assert FisherMap.load(out).meta["dataset"] == "mnist-test10k"


def test_fid_model_writes_per_seed_results_the_floor_and_cached_reference_statistics(folder, capsys):
    from lafq.cli import main

    assert main(["fid", "--model", str(folder), "--n", "20", "--seeds", "2", "--steps", "2", "--real-floor",
                 "--threads", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["fid_values"]) == 2 and len(res["accuracy_values"]) == 2 and res["reference"] == "mnist-train5k"
    assert len(res["real_floor"]["fid_values"]) == 2 and res["real_floor"]["train"] == "mnist-test10k"
    per_seed = sorted((folder / "eval").glob("fid-*.json"))
    assert len([p for p in per_seed if "-n20-" not in p.name]) == 2
    assert (folder / "eval" / "fid-n20-ddim2-w1.5.json").is_file()
    assert [p.name.split("-")[0] for p in (folder / "stats").glob("*.npz")] == ["mnist"]
    assert main(["fid", "--model", str(folder / "unet")]) == 2
    assert "no lafq.json" in capsys.readouterr().err


def test_fisher_and_quantize_with_model_run_the_diffusers_folder_commands_and_sample_draws_its_classes(folder, tmp_path,
                                                                                                      capsys):
    from PIL import Image

    from lafq.cli import build_parser, main
    from lafq.fisher import FisherMap

    for verb in ("fisher", "quantize", "fid", "sample", "report", "export"):  # one command per verb, --model on each
        assert "--model" in build_parser()._subparsers._group_actions[0].choices[verb].format_help(), verb
    out = tmp_path / "f.safetensors"
    assert main(["fisher", "--model", str(folder), "--dataset", "mnist-train5k", "--bins", "2", "--samples", "2",
                 "--device", "cpu", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["command"] == "fisher" and FisherMap.load(out).names
    assert main(["quantize", f"--model={folder}", "--fisher", str(out), "--avg-bits", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["size"]["avg_bits"] <= 6
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(folder), "--n", "4", "--steps", "2", "--device", "cpu", "--out", str(grid),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["labels"] == [0, 1, 2, 3] and Image.open(grid).size[0] > 28
    assert main(["sample", "--model", str(tmp_path / "nowhere"), "--out", str(grid)]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_report_with_model_measures_a_diffusers_folder_with_its_own_edges_classifier_and_reference(folder, capsys):
    from dataclasses import replace

    from lafq.cli import main
    from lafq.fisher import FisherMap
    from lafq.models import load_diffusers
    from lafq.report import EDGE, Settings, Subject, edge_layers, feasible_budgets, grid

    assert main(["fisher", "--model", str(folder), "--dataset", "mnist-train5k", "--bins", "2", "--samples", "4",
                 "--device", "cpu", "--out", str(folder / "fisher.safetensors")]) == 0
    module = load_diffusers(folder).module
    assert edge_layers(module) == ("conv_in", "conv_out")
    subject = Subject(edge_layers=edge_layers(module), source_strategies=False)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    assert feasible_budgets(shapes, (6.0, 4.5)) == (6.0,)  # biases and norms weigh much in a tiny model
    rows = grid(module, FisherMap.load(folder / "fisher.safetensors"), replace(Settings.quick(), budgets=(6.0,)), subject)
    edge = next(r for r in rows if r.name == EDGE).plan.precisions
    assert edge["conv_in.weight"] == edge["conv_out.weight"] == "int8"
    assert {p for n, p in edge.items() if n.endswith("conv1.weight")} == {"int4"}
    assert not [r for r in rows if r.kind == "source"]

    capsys.readouterr()
    assert main(["report", "--model", str(folder), "--quick", "--n", "6", "--steps", "2", "--seeds", "2",
                 "--random-seeds", "1", "--skip-sensitivity", "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["records"] > 2 * 8 and res["out_dir"] == str(folder / "report")
    assert "floor of 5.33 bits/weight left out: 4.5" in err
    text = (folder / "report" / "report.md").read_text()
    assert "Partial" not in text and "(`conv_in`, `conv_out`)" in text and "source's table" not in text
    assert "Not part of this run (`--skip-sensitivity`)." in text
    assert f"python -m lafq report --quick --model {folder} " in text and "of mnist-test10k vs mnist-train5k" in text
    assert sorted((folder / "eval" / "report" / "quick").glob("fid+fidelity-*.json"))
    # Again with the sensitivity stage: the grid's records are found on disk, each layer is lowered alone.
    assert main(["report", "--model", str(folder), "--quick", "--n", "6", "--steps", "2", "--seeds", "2",
                 "--random-seeds", "1", "--device", "cpu", "--json"]) == 0
    text = (folder / "report" / "report.md").read_text()
    assert "Spearman ρ of each predictor" in text and (folder / "report" / "sensitivity.csv").is_file()
    assert main(["report", "--model", str(folder), "--checkpoint", "x.safetensors"]) == 2
    assert "--checkpoint and --model name two models" in capsys.readouterr().err
    assert main(["report", "--model", str(folder), "--backend", "inception"]) == 2
    assert "the folder's own classifier as FID backend" in capsys.readouterr().err


def test_sample_and_fid_run_a_quantized_diffusers_file_with_its_folder(folder, tmp_path, capsys):
    """A quantized diffusers file holds no scheduler: `--model FOLDER --weights FILE` samples it with the folder's."""
    from PIL import Image

    from lafq.cli import main

    q = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", str(folder), "--strategy", "uniform", "--target", "int4", "--out", str(q),
                 "--json"]) == 0
    capsys.readouterr()
    args = ["sample", "--model", str(folder), "--n", "4", "--steps", "2", "--device", "cpu", "--json"]
    assert main([*args, "--out", str(tmp_path / "fp32.png")]) == 0
    assert main([*args, "--weights", str(q), "--out", str(tmp_path / "int4.png")]) == 0
    capsys.readouterr()
    assert Image.open(tmp_path / "fp32.png").tobytes() != Image.open(tmp_path / "int4.png").tobytes()
    assert main(["fisher", "--model", str(folder), "--weights", str(q), "--bins", "1", "--samples", "1"]) == 2
    assert "not a quantized one" in capsys.readouterr().err
    assert main(["fid", "--model", str(folder), "--weights", str(q), "--n", "10", "--seeds", "1", "--steps", "2",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["weights"] == str(q) and (folder / "eval" / "fid-n10-ddim2-w1.5-q.json").is_file()  # not FP32's file
    assert not (folder / "eval" / "fid-n10-ddim2-w1.5.json").exists()
    assert main(["fid", "--model", "owner/some-model", "--n", "10"]) == 2
    assert "is neither" in capsys.readouterr().err
