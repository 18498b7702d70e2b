"""Every number in README's by-model table and docs/evidence.md's table of all rows, re-derived from the per-seed
records (docs/report.csv; each shipped model's report.csv and sensitivity.csv) at the precision it is shown with
(rounded to nearest): a table edited by hand, or a report re-run without the docs following it, fails here."""
import re
from pathlib import Path

import pytest

from lafq.report import EDGE, compare, read_csv, summarize

REPO = Path(__file__).resolve().parent.parent

ROWS = {  # README's label -> the report row it quotes
    "uniform INT8": "uniform int8",
    "INT4, INT8 stem and head": EDGE,
    "Fisher budget at the same size": f"budget @ {EDGE} size",
    "Fisher budget at the INT4 + INT8 stem and head size": f"budget @ {EDGE} size",
    "INT4, FP16 stem and head": "int4, fp16 stem+head",
    "INT4-g32, FP16 stem and head": "int4-g32, fp16 stem+head",
    "INT8, FP16 head": "int8, fp16 head",
    "Fisher budget at the INT8 + FP16 head size": "budget @ int8, fp16 head size",
    "INT4-g32, INT8 stem and head": "int4-g32, int8 stem+head",
    "Fisher budget at the INT4-g32 + INT8 stem and head size": "budget @ int4-g32, int8 stem+head size",
    "Fisher budget at the INT4-g32 + FP16 stem and head size": "budget @ int4-g32, fp16 stem+head size",
    "measured-sensitivity budget at the INT4-g32 size": "measured-sensitivity budget @ int4-g32 size",
    "uniform INT4, per channel": "uniform int4",
    "uniform INT4-g32": "uniform int4-g32",
    "error-only budget at the INT4-g32 size": "error-only budget @ int4-g32 size",
    "error-only budget, head at FP16, INT4-g32 size": "error-only budget, fp16 head @ int4-g32 size",
    "Fisher budget at the INT4-g32 size": "budget @ int4-g32 size",
    "Fisher budget, 6 bits": "budget 6 bits",
    "uniform FP16": "uniform fp16",
    "source: layer ratio p = 0.25 → FP16": "layer-ratio fp16",
    "uniform INT4-g64": "uniform int4-g64",
    "magnitude budget at the INT4-g32 size": "magnitude budget @ int4-g32 size",
    "source: layer groups → FP16": "groups fp16",
    "source: layer mean/std → FP16": "layer-std fp16",
    **{f"Fisher budget, {b} bits": f"budget {b} bits" for b in ("8", "5", "4.5", "4.25")},
}
COLUMNS = {"ΔFID vs FP32": ("dfid", 1), "mean abs Δ to FP32": ("mad", 1000), "feature distance": ("feature_distance", 100),
           "class agreement with FP32": ("agreement", 100)}
NUMBER = r"([+\-−]?[\d,]+(?:\.\d+)?)"


def _value(text: str) -> tuple[float, int]:
    """A shown number and its decimals ('−0.71' -> (-0.71, 2))."""
    t = text.replace("−", "-").replace(",", "")
    return float(t), len(t.split(".")[1]) if "." in t else 0


def _matches(shown: str, value: float) -> bool:
    """`shown` is `value` rounded to nearest at its own digits."""
    v, decimals = _value(shown)
    return abs(value - v) <= 0.5 * 10 ** -decimals + 1e-9


def _table(path: Path) -> tuple[list[str], list[list[str]]]:
    """(column titles, rows) of the file's table that starts with `| plan (bytes) |`."""
    text = path.read_text(encoding="utf-8")
    block = "| plan (bytes) |" + text.split("| plan (bytes) |", 1)[1].split("\n\n", 1)[0]
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines() if line.startswith("|")]
    return lines[0], lines[2:]


@pytest.mark.parametrize("doc", ["docs/evidence.md"])
def test_every_number_in_the_tables_is_the_reports_own(doc):
    by = {r["name"]: r for r in summarize(read_csv(REPO / "docs" / "report.csv"))}
    titles, rows = _table(REPO / doc)
    assert rows and all(re.sub(r" \([\d,]+\)$", "", row[0]) in ROWS for row in rows)
    for row in rows:
        label = row[0]
        r = by[ROWS[re.sub(r" \([\d,]+\)$", "", label)]]
        assert int(re.search(r"\(([\d,]+)\)$", label).group(1).replace(",", "")) == r["bytes"], label
        for title, cell in zip(titles[1:], row[1:]):
            key, scale = COLUMNS[title]
            mean, half = (r["dfid"], r["dfid_ci95"]) if key == "dfid" else (r[key], r[f"{key}_ci95"])
            m, h = (x.strip("* ‰%") for x in cell.split("±"))
            assert _matches(m, scale * mean) and _matches(h, scale * half), (doc, label, title, cell, scale * mean,
                                                                            scale * half)


def test_the_headline_sentence_on_fid_is_the_paired_difference_in_the_report():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"its FID against the data is worse by \+" + NUMBER + r" ± " + NUMBER, text)
    c = compare(read_csv(REPO / "docs" / "report.csv"), f"budget @ {EDGE} size", EDGE)
    assert m and _matches(m.group(1), c["fid"][0]) and _matches(m.group(2), c["fid"][1])


MODELS = {  # README's "by model" rows -> (the model's report.csv, its sensitivity.csv)
    "MNIST U-Net (lafq, convolutional)": ("docs/report.csv", "docs/sensitivity.csv"),
    "Fashion-MNIST UNet2DModel (diffusers, convolutional)": ("checkpoints/fashion/report/report.csv",
                                                             "checkpoints/fashion/report/sensitivity.csv"),
    "Fashion-MNIST DiT (diffusers, transformer)": ("checkpoints/dit/report/report.csv",
                                                   "checkpoints/dit/report/sensitivity.csv"),
}
PAIRS = {  # the by-model table's columns -> (the Fisher budget's row, the recipe it is paired with)
    "vs INT4 + INT8 first/last": (f"budget @ {EDGE} size", EDGE),
    "vs uniform INT4-g32": ("budget @ int4-g32 size", "uniform int4-g32"),
    "vs INT4-g32 + FP16 first/last": ("budget @ int4-g32, fp16 stem+head size", "int4-g32, fp16 stem+head"),
}


def _model_table(path: Path) -> tuple[list[str], list[list[str]]]:
    text = path.read_text(encoding="utf-8")
    block = "| model |" + text.split("| model |", 1)[1].split("\n\n", 1)[0]
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines() if line.startswith("|")]
    return lines[0], lines[2:]


def test_every_number_in_the_by_model_table_is_that_models_own_report():
    """One row per model family: the Fisher budget paired with each recipe at equal size (mean |Δ| in ‰ / ΔFID, from
    that model's report.csv) and the Spearman ρ of the budget's predictor (from its sensitivity.csv)."""
    from lafq import sensitivity

    titles, rows = _model_table(REPO / "README.md")
    assert [row[0] for row in rows] == list(MODELS)
    for row in rows:
        report, sens = (REPO / p for p in MODELS[row[0]])
        records = read_csv(report)
        for title, cell in zip(titles[1:], row[1:]):
            if title.startswith("Spearman ρ"):
                rho = sensitivity.summarize(read_csv(sens))["measures"]["mad"]["rho"]["fisher_x_error"][0]
                assert _matches(cell, rho), (row[0], cell, rho)
                continue
            c = compare(records, *PAIRS[title])
            mad, fid = (part.strip() for part in cell.split("/"))
            for shown, (mean, half, _), scale in ((mad, c["mad"], 1000), (fid, c["fid"], 1)):
                m, h = (x.strip("* ‰") for x in shown.split("±"))
                assert _matches(m, scale * mean) and _matches(h, scale * half), (row[0], title, shown, scale * mean,
                                                                                scale * half)
