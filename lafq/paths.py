"""Where the shipped files live: one place, as absolute paths, so every command and the app find the same
files from any working directory (a path given on the command line is still taken as given)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO / "checkpoints"
UNET = CHECKPOINTS / "unet.safetensors"
FISHER = CHECKPOINTS / "fisher.safetensors"
CLASSIFIER = CHECKPOINTS / "classifier.safetensors"
STATS = CHECKPOINTS / "stats"
REPORT_CACHE = CHECKPOINTS / "eval" / "report"
DOCS = REPO / "docs"
