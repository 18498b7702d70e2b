"""Start `python app.py` as its own process and wait until it serves: for the tests that check what a fresh
install or a built Space serves (the other app tests serve the app in-process, tests/app/conftest.py)."""
from __future__ import annotations

import contextlib
import queue
import socket
import subprocess
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cmd: list[str], cwd, env: dict, port: int, what: str, timeout: float = 300):
    """Run `cmd` (an app.py on `port`) until the block ends; yields (url, the lines it printed so far). Fails the
    test with the output when it exits before gradio prints its URL."""
    import pytest

    p = subprocess.Popen(cmd, cwd=cwd, env={**env, "GRADIO_SERVER_PORT": str(port), "PYTHONUNBUFFERED": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout] + [lines.put(None)], daemon=True).start()
    seen: list[str] = []
    try:
        while True:  # gradio prints its URL once the server accepts connections
            line = lines.get(timeout=timeout)
            if line is None:
                pytest.fail(f"{what} exited with {p.wait()}:\n{''.join(seen)}")
            seen.append(line)
            if "Running on local URL" in line:
                break
        yield f"http://127.0.0.1:{port}/", seen
    finally:
        p.terminate()
        p.wait(timeout=60)
