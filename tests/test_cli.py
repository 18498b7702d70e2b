import json
import os
import subprocess
import sys

import pytest
import torch

from lafq.cli import main
from lafq.diffusion import DEFAULT_GUIDANCE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    """The real entry point, in a subprocess, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "lafq", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_every_command_has_help():
    for cmd in ("train", "sample", "fid", "fisher", "quantize"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "--json" in r.stdout, cmd


def test_sample_writes_the_same_bytes_for_the_same_seed(tiny_ckpt, tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(["sample", "--checkpoint", str(tiny_ckpt), "--n", "4", "--steps", "3", "--seed", "0", "--out", str(a)]) == 0
    assert main(["sample", "--checkpoint", str(tiny_ckpt), "--n", "4", "--steps", "3", "--seed", "0", "--out", str(b)]) == 0
    assert main(["sample", "--checkpoint", str(tiny_ckpt), "--n", "4", "--steps", "3", "--seed", "1", "--out", str(c),
                 "--json", "--classes", "7"]) == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert a.read_bytes()[:4] == b"\x89PNG"
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["labels"] == [7, 7, 7, 7] and res["seed"] == 1


def test_fid_json_reports_backend_n_ci_and_floor(tiny_ckpt, capsys):
    assert main(["fid", "--checkpoint", str(tiny_ckpt), "--n", "20", "--steps", "2", "--seeds", "2",
                 "--backend", "classifier", "--real-floor", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["backend"] == "classifier" and res["n"] == 20 and len(res["fid_values"]) == 2
    assert res["guidance"] == DEFAULT_GUIDANCE  # no --guidance: the library's default, and the JSON says which
    assert res["fid_ci95"] >= 0 and len(res["accuracy_values"]) == 2
    assert res["real_floor"]["n"] == 20 and res["real_floor"]["fid_mean"] < res["fid_mean"]


def test_fid_cache_splits_a_run_over_calls(tiny_ckpt, tmp_path, capsys):
    base = ["fid", "--checkpoint", str(tiny_ckpt), "--n", "12", "--steps", "2", "--backend", "classifier",
            "--cache-dir", str(tmp_path), "--json"]
    assert main(base + ["--seeds", "1"]) == 0  # a first session finishes seed 0 only
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len([p for p in tmp_path.glob("fid-*.json") if "-ddim" not in p.name]) == 1  # per-seed results
    assert main(base + ["--seeds", "2"]) == 0
    out = capsys.readouterr()
    both = json.loads(out.out.strip().splitlines()[-1])
    assert "seed 0: FID" in out.err and "from " in out.err  # reused, not recomputed
    assert both["fid_values"][0] == first["fid_values"][0] and len(both["fid_values"]) == 2
    assert len([p for p in tmp_path.glob("fid-*.json") if "-ddim" not in p.name]) == 2  # per-seed results
    assert main(base + ["--seeds", "1", "--steps", "3"]) == 0  # another spec is another key
    capsys.readouterr()
    assert len([p for p in tmp_path.glob("fid-*.json") if "-ddim" not in p.name]) == 3  # per-seed results


def test_bench_rejects_unknown_sections(capsys):
    assert main(["bench", "--only", "sampling,speed"]) == 2
    assert "unknown bench section(s) ['speed']" in capsys.readouterr().err


def test_train_cli_on_a_tiny_budget(tmp_path, capsys):
    assert main(["train", "--steps", "3", "--batch-size", "4", "--base-channels", "8", "--out", str(tmp_path),
                 "--sample-every", "1000", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 3 and (tmp_path / "unet.safetensors").is_file()
    assert res["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "nope.safetensors"], "no such file"),
    (["--classes", "x"], "--classes takes digits"),
    (["--classes", "12"], "class labels must be in [0, 9]"),
])  # NaN and out-of-range numbers: tests/test_cli_errors.py
def test_bad_input_is_one_clear_line(args, message, capsys, tiny_ckpt):
    assert main(["sample", "--checkpoint", str(tiny_ckpt), "--steps", "1", "--n", "2"] + args + ["--out", os.devnull]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_argparse_rejects_nonpositive_counts():
    r = run_cli("sample", "--n", "0")
    assert r.returncode == 2 and "--n must be at least 1" in r.stderr


def test_train_classifier_writes_a_loadable_classifier_with_its_held_out_accuracy(tmp_path, capsys):
    from lafq.classifier import load_classifier

    out = tmp_path / "clf.safetensors"
    assert main(["train-classifier", "--out", str(out), "--limit", "256", "--epochs", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 256 and res["heldout"] == "mnist-train5k" and 0 <= res["heldout_accuracy"] <= 1
    model, meta = load_classifier(out)
    assert meta["train"]["epochs"] == 1 and meta["train"]["heldout_accuracy"] == res["heldout_accuracy"]
    with pytest.raises(SystemExit) as e:  # argparse: out of range is one line and exit 2
        main(["train-classifier", "--out", str(out), "--epochs", "0"])
    assert e.value.code == 2 and "--epochs must be in [1, 1000]" in capsys.readouterr().err


def test_an_option_the_strategy_does_not_read_is_named_not_silently_ignored(tiny_ckpt, tmp_path, capsys):
    """Strategies are declared once (lafq.policy.STRATEGY_DEFS): the CLI knows which options each reads."""
    from lafq.policy import STRATEGY_DEFS

    assert main(["quantize", "--model", str(tiny_ckpt), "--strategy", "uniform", "--target", "int8", "--p", "0.5",
                 "--json"]) == 0
    err = capsys.readouterr().err
    assert "note: strategy 'uniform' does not read --p" in err
    assert {"avg_bits", "statistic"} <= set(STRATEGY_DEFS["budget"].reads) and not STRATEGY_DEFS["uniform"].ranks
