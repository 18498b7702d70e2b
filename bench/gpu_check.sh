#!/usr/bin/env bash
# GPU checks and timings, on a machine with a CUDA GPU (recorded in docs/benchmark-runs.md, "GPU").
#   bash bench/gpu_check.sh OUTDIR
# Runs the GPU tests (tests/test_device.py and the library tests beside them), then times the
# shipped model on the GPU: sampling, the acceptance FID run, a full Fisher map, training steps,
# and the quantized-model latency section of `python -m lafq bench`.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/gpu.txt"
$py -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version())" | tee -a "$out/gpu.txt"

# Library tests (the app's tests need gradio and a browser; they run in CI on the CPU).
$py -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_train.py tests/test_fisher.py \
    tests/test_quantize.py tests/test_diffusion.py tests/test_cli.py tests/test_metrics.py 2>&1 | tee "$out/pytest.log" | tail -15

# Sampling: 1,000 balanced class-conditional digits, DDIM-50, default guidance.
$py -m lafq sample --n 1000 --steps 50 --seed 0 --batch-size 256 --out "$out/sample1000.png" --json | tee "$out/sample.json"
$py -m lafq sample --n 16 --steps 50 --seed 0 --out "$out/grid16.png" --json | tee -a "$out/sample.json"

# The issue-2 acceptance FID on the GPU: same seeds and noise as the CPU run, so the FIDs should agree.
$py -m lafq fid --n 5000 --steps 100 --seeds 3 --real-floor --json --cache-dir "$out/eval" 2>&1 | tee "$out/fid.log" | tail -3

# A full 50-bin x 64-sample Fisher map (54 s on the 2-core CPU).
for m in hooks vmap; do
  $py -m lafq fisher --bins 50 --samples 64 --method $m --out "$out/fisher-$m.safetensors" --json | tee -a "$out/fisher.json" | cut -c1-300
done

# Training throughput: 600 steps of the shipped recipe (batch 64), then batch 256.
for b in 64 256; do
  $py -m lafq train --steps 30000 --until 600 --batch-size $b --save-every 600 --sample-every 100000 \
      --out "$out/train-b$b" --json | tee -a "$out/train.json"
done

$py -m lafq bench --only quantized --json 2>"$out/bench.err" | tee "$out/bench.json" | cut -c1-400
