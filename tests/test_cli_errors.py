"""Bad input to the CLI: one line saying what was wrong and exit 2; Ctrl-C: "interrupted", exit 130; never a traceback."""
import os
import signal
import subprocess
import sys

import pytest

from lafq.checkpoint import save_file
from lafq.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files(tmp_path, tiny_ckpt) -> dict:
    """Hostile and broken inputs, by name."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    plans = {"list.json": "[1]", "null.json": '{"precisions": null}', "string.json": '{"precisions": "fp16"}',
             "listprec.json": '{"precisions": ["fp16"]}', "lacks.json": '{"precisions": {"nope.weight": "fp16"}}',
             "int2.json": '{"precisions": {"stem.weight": "int2"}}', "deep.json": "[" * 100_000 + "]" * 100_000,
             "broken.json": "{", "latin1.json": b"\xff\xfe".decode("latin-1"),
             "badpolicy.json": '{"precisions": {}, "policy": {"strategy": "budget", "avg_bits": "many"}}'}
    for name, text in plans.items():
        (tmp_path / name).write_text(text, encoding="latin-1")
    save_file(tmp_path / "fisher-missing-keys.safetensors", {}, {"kind": "fisher"})
    return {"ckpt": str(tiny_ckpt), **{k: str(tmp_path / k) for k in
                                       ["a-file", "a-dir", *plans, "fisher-missing-keys.safetensors"]}}


CASES = [  # (arguments with <placeholders>, what the one line must say)
    ("sample --eta nan", "--eta must be in"),
    ("sample --eta -5", "--eta must be in"),
    ("sample --guidance 1e308", "--guidance must be in"),
    ("sample --guidance inf", "--guidance must be in"),
    ("sample --seed -1", "--seed must be in"),
    ("train --lr nan", "--lr must be in"),
    ("quantize --p nan", "--p must be in"),
    ("quantize --threshold 2", "--threshold must be in"),
    ("quantize --avg-bits 0", "--avg-bits must be in"),
    ("quantize --k inf", "--k must be in"),
    ("quantize --budget-bytes -1", "--budget-bytes must be in"),
    ("fisher --bins 0", "--bins must be in"),
    ("sample --checkpoint <ckpt> --n 1 --steps 1 --out <a-dir>", "is a directory"),
    ("sample --checkpoint <ckpt> --n 1 --steps 1 --out <a-file>/x.png", "a parent folder is a file"),
    ("sample --checkpoint <a-dir>", "has no config.json: not a diffusers model folder"),
    ("sample --checkpoint <a-file>", "not a valid .safetensors"),
    ("quantize --checkpoint <ckpt> --plan <a-dir>", "is a directory"),
    ("quantize --checkpoint <ckpt> --plan <a-dir>/missing.json", "no such file"),
    ("quantize --checkpoint <ckpt> --plan <list.json>", "got a list"),
    ("quantize --checkpoint <ckpt> --plan <null.json>", "got null"),
    ("quantize --checkpoint <ckpt> --plan <string.json>", "got str"),
    ("quantize --checkpoint <ckpt> --plan <listprec.json>", "got list"),
    ("quantize --checkpoint <ckpt> --plan <lacks.json>", "the model lacks"),  # without --out: still validated
    ("quantize --checkpoint <ckpt> --plan <int2.json>", "unknown precision"),
    ("quantize --checkpoint <ckpt> --plan <deep.json>", "nested deeper"),
    ("quantize --checkpoint <ckpt> --plan <broken.json>", "invalid JSON"),
    ("quantize --checkpoint <ckpt> --plan <latin1.json>", "not UTF-8 text"),
    ("quantize --checkpoint <ckpt> --plan <badpolicy.json>", "not a valid lafq policy"),
    ("quantize --checkpoint <ckpt> --strategy groups --group-thresholds [1]", "got a list"),
    ("quantize --checkpoint <ckpt> --strategy groups --group-thresholds {", "takes a JSON object"),
    ('quantize --checkpoint <ckpt> --strategy groups --group-thresholds {"mid":"x"}', "numbers in [0, 1]"),
    ("quantize --checkpoint <ckpt> --fisher <fisher-missing-keys.safetensors>", "not a complete Fisher map"),
    ("quantize --checkpoint <ckpt> --fisher <a-dir>", "is not a file"),
]


@pytest.mark.parametrize("args, message", CASES)
def test_bad_cli_input_is_one_line_and_exit_code_2(args, message, tmp_path, tiny_ckpt, capsys):
    for name, path in files(tmp_path, tiny_ckpt).items():
        args = args.replace(f"<{name}>", path)
    argv = args.split()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: usage line, then the error line
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message.lower() in err[-1].lower(), err
    assert not any("Traceback" in line for line in err) and err[-1].startswith(("error:", "python -m lafq"))


def test_ctrl_c_is_one_line_and_exit_code_130(tiny_ckpt):
    # As in a terminal: SIGINT at its default in the child, also when this suite runs as a background job (a
    # non-interactive shell starts `cmd &` with SIGINT ignored, and Python keeps an inherited SIG_IGN).
    proc = subprocess.Popen([sys.executable, "-m", "lafq", "fid", "--checkpoint", str(tiny_ckpt), "--n", "5000",
                             "--steps", "200", "--seeds", "1", "--device", "cpu"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().startswith("FID:")  # it is computing now
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"


def test_the_app_refuses_a_port_that_is_not_a_number_in_one_line():
    r = subprocess.run([sys.executable, "app.py"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "GRADIO_SERVER_PORT": "notaport"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: GRADIO_SERVER_PORT must be a port number")


def test_the_app_falls_back_from_a_fisher_file_missing_keys(tmp_path, tiny_ckpt):
    from demo.state import load_state

    broken = tmp_path / "fisher.safetensors"
    save_file(broken, {}, {"kind": "fisher"})
    state = load_state(tiny_ckpt, broken, quick_bins=2, quick_samples=1, device="cpu")
    assert "unreadable" in state.fisher_note and state.fisher.bins == 2


def test_a_model_file_without_its_card_gets_one_line_naming_the_card(tmp_path, tiny_model, capsys):
    from lafq.checkpoint import save_unet

    bare = tmp_path / "bare.safetensors"
    save_unet(bare, tiny_model, train={"steps": 0})
    for argv in (["fid", "--model", str(bare), "--n", "10"], ["fisher", "--model", str(bare), "--bins", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and "lafq.json" in err[-1] and not any("Traceback" in e for e in err)
