"""Seconds from `python app.py` to the first HTTP 200 on the page (offline, shipped checkpoints).

    python bench/cold_start.py [--runs 2]
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


def once() -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    for i in range(ap.parse_args().runs):
        print(f"run {i + 1}: cold start {once():.1f}s")
