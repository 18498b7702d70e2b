#!/usr/bin/env bash
# The README's two commands as a new user runs them: a fresh clone of HEAD, a new venv, no user site-packages,
# and no dataset outside the repo (LAFQ_SYSTEM_DATA=0 hides Debian's /usr/share/datasets and torchvision's cache).
#   1. python -m pip install -r requirements.txt && python app.py  -> serves, and every listed model compares
#   2. bash scripts/test.sh                                          -> the whole suite passes
# Prints PASS/FAIL for each and exits non-zero if either fails. Not part of CI (it installs torch into a new
# venv: minutes and about 6 GB); run it before a release or after changing a requirements file.
# Usage: bash scripts/fresh_check.sh [WORKDIR]   (default: a new temporary folder, removed afterwards)
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-}"
if [ -z "$work" ]; then
  work="$(mktemp -d /tmp/lafq-fresh.XXXXXX)"
  trap '[ "${failed:-0}" = 1 ] && echo "kept $work for its logs" || rm -rf "$work"' EXIT
fi
mkdir -p "$work"
python="${PYTHON:-python3}"
export PYTHONNOUSERSITE=1 LAFQ_SYSTEM_DATA=0 GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
unset PYTHONPATH LAFQ_MODELS

git clone -q "$repo" "$work/lafq" || { echo "FAIL: git clone"; exit 1; }
cd "$work/lafq"
echo "fresh clone of $(git rev-parse --short HEAD) in $work/lafq ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"

results=()
"$python" -m venv "$work/venv-app" && . "$work/venv-app/bin/activate" || { echo "FAIL: venv"; exit 1; }
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
app_ok=0
if python -m pip install -q -r requirements.txt; then
  GRADIO_SERVER_PORT=$port python app.py >"$work/app.log" 2>&1 &
  app_pid=$!
  # Ready when gradio answers (bounded: 300 s); then select and compare every model the app lists.
  if python - "$port" <<'EOF'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/"
deadline = time.monotonic() + 300
while True:
    try:
        urllib.request.urlopen(url, timeout=5).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("app.py did not answer within 300 s")
        time.sleep(1)
from gradio_client import Client
from demo.models import discover
client = Client(url, verbose=False)
for e in discover({}):
    client.predict(e.id, api_name="/select_model")
    images = client.predict("0", 1.5, 2, 0, 1, True, api_name="/compare")[:3]
    assert all(images), e.id
    print(f"  {e.id}: selected and compared")
EOF
  then app_ok=1; fi
  kill "$app_pid" 2>/dev/null; wait "$app_pid" 2>/dev/null
fi
deactivate
if [ $app_ok = 1 ]; then results+=("PASS: app command"); else results+=("FAIL: app command (log: $work/app.log)"); tail -20 "$work/app.log"; fi

"$python" -m venv "$work/venv-test" && . "$work/venv-test/bin/activate" || { echo "FAIL: venv"; exit 1; }
if bash scripts/test.sh -p no:cacheprovider -rs; then results+=("PASS: test command"); else results+=("FAIL: test command"); fi
deactivate

printf '%s\n' "${results[@]}"
for r in "${results[@]}"; do case "$r" in FAIL*) failed=1; exit 1;; esac; done
