import csv


from lafq.data import load_dataset
from lafq.fisher import compute_fisher
from lafq.metrics import ClassifierBackend
from lafq.report import Settings, grid, run, write


def test_report_grid_rows_files_and_findings(tiny_model, tmp_path):
    x, y = load_dataset("mnist-train5k").tensors()
    fm = compute_fisher(tiny_model, x[::25], y[::25], bins=2, samples_per_bin=2)
    s = Settings(n=10, steps=2, seeds=2, guidance=3.0, targets=("fp16",), budgets=(8.0,))
    names = [n for n, _ in grid(tiny_model, fm, s)]
    assert names[0] == "fp32" and "uniform fp16" in names and "budget 8 bits" in names
    assert "random @ layer-ratio fp16" in names and "random @ budget 8 bits" in names
    backend = ClassifierBackend()
    rows = run(tiny_model, fm, s, backend, backend.model, log=lambda m: None)
    by = {r["name"]: r for r in rows}
    assert all(r["guidance"] == 3.0 for r in rows)  # the spec sampled with, not only the text
    assert by["fp32"]["pct_of_fp32"] == 100 and by["uniform fp16"]["pct_of_fp32"] == 50
    assert by["random @ budget 8 bits"]["bytes"] <= by["budget 8 bits"]["bytes"]
    plans = dict(grid(tiny_model, fm, s))
    assert set(plans["random @ layer-ratio fp16"].precisions.values()) <= {"fp32", "fp16"}  # same target, random tensors
    assert by["fp32"]["dfid_mean"] == 0 and by["fp32"]["dfid_ci95"] == 0
    d = [a - b for a, b in zip(by["uniform fp16"]["fid_values"], by["fp32"]["fid_values"])]
    assert by["uniform fp16"]["dfid_mean"] == round(sum(d) / 2, 4)
    write(rows[:3], s, "python -m lafq report --test", 1.0, tmp_path, total_rows=len(rows))
    assert "Partial: 3 of" in (tmp_path / "report.md").read_text()
    from lafq.pipeline import real_floor
    write(rows, s, "python -m lafq report --test", 1.0, tmp_path, floor=real_floor(backend, 10, [0, 1]))
    md = (tmp_path / "report.md").read_text()
    assert "Real-vs-real floor at the same backend and N (10 of" in md
    assert "Partial" not in md and "ΔFID vs FP32 (paired)" in md and "Goal 2" in md
    assert "backend **classifier**" in md and "N = 10" in md and "guidance 3," in md and "| uniform fp16 |" in md and "budget 8 bits" in md
    with open(tmp_path / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "report_pareto.svg").read_text().startswith("<svg")
