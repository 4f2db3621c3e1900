#!/usr/bin/env bash
# The GPU check of issue 10: the hf engine on CUDA, behind Commutator's embedded stack, driven by the
# official openai client; prints greedy parity with transformers, TTFT and tokens/s.
#
# For a machine with an NVIDIA GPU, Python 3.12 with torch (CUDA build) and transformers, and no package
# index: first, where an index is reachable, `make gpu-wheelhouse` (build/gpu-wheelhouse, ~50 MiB), then
# carry the checkout with that folder and run `tests/gpu/gpu_check.sh` there (under 10 minutes).
# GPU_CHECK_DEVICE=cpu runs the same check on a CPU (a dry run of the script itself).
set -euo pipefail
cd "$(dirname "$0")/../.."
wheelhouse=${WHEELHOUSE:-build/gpu-wheelhouse}
venv=${GPU_VENV:-/tmp/commutator-gpu-venv}
[ -f "$wheelhouse/requirements-gpu.txt" ] || { echo "no wheelhouse at $wheelhouse: run 'make gpu-wheelhouse' first"; exit 2; }
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" tests/gpu/gpu_check.py install "$wheelhouse"
exec "$venv/bin/python" tests/gpu/gpu_check.py run --device "${GPU_CHECK_DEVICE:-cuda}" "$@"
