"""Seconds from `python app.py` to the first HTTP 200 on the page (offline, shipped checkpoints).

    python bench/cold_start.py [--runs 2]
    python bench/cold_start.py --dir /tmp/lafq-space --runs 3   # a folder from `python -m lafq space build`,
                                                                # with the environment a Space sets
"""
import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def once(app_dir: Path = REPO) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    if Path(app_dir).resolve() != REPO:  # a built Space: its own files only, served as a Space serves it, offline
        env.pop("PYTHONPATH", None)
        env.update(SYSTEM="spaces", SPACE_ID="bench/lafq", GRADIO_SERVER_NAME="0.0.0.0", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "app.py"], cwd=app_dir, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        while p.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                return time.perf_counter() - t0
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"app.py exited with {p.returncode} before serving")
    finally:
        p.terminate()
        p.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=REPO, help="the folder holding app.py (default: this repo)")
    a = ap.parse_args()
    if not (a.dir / "app.py").is_file():
        raise SystemExit(f"error: {a.dir} has no app.py; pass the repo or a folder from `python -m lafq space build`")
    times = [once(a.dir) for _ in range(a.runs)]
    for i, t in enumerate(times):
        print(f"run {i + 1}: cold start {t:.1f}s")
    print(f"median of {len(times)}: {sorted(times)[len(times) // 2]:.1f}s ({a.dir})")
