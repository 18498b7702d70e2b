"""The README is short and every command and code block in it runs as written."""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_at_most_150_lines():
    assert len(README.splitlines()) <= 150


def test_every_command_in_the_readme_parses_with_the_cli():
    from lafq.cli import build_parser

    commands = re.findall(r"`(python -m lafq [^`]+)`", README)
    assert len(commands) >= 9
    parser = build_parser()
    for line in commands:
        argv = shlex.split(line)[3:]
        if argv[-1] == "--help":
            continue
        args = parser.parse_args(argv)  # argparse exits on an unknown option or a bad value
        assert callable(args.func), line


def test_the_python_example_runs_for_the_shipped_diffusers_model(tmp_path, monkeypatch):
    """The README's Python block, as written, in a scratch folder that sees the repo's checkpoints."""
    if not (ROOT / "checkpoints" / "fashion" / "lafq.json").is_file():
        pytest.skip("checkpoints/fashion is not in this checkout")
    block = re.search(r"## In Python, for any model\n\n```python\n(.*?)```", README, re.S).group(1)
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    images, labels, q = scope["images"], scope["labels"], scope["q"]
    assert images.shape == (8, 1, 28, 28) and labels.tolist() == list(range(8))
    back, _ = scope["load_quantized"]("q.safetensors")
    assert back.lafq_plan.precisions == q.lafq_plan.precisions
    from lafq.plan import param_shapes
    from lafq.quantize import size_report
    assert size_report(scope["plan"], param_shapes(scope["den"].module)).avg_bits <= 4.5
