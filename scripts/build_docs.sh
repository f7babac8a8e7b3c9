#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html (open docs/_build/html/index.html from disk; no server,
# no network). Strict: any warning (broken link, missing reference, docstring markup) fails the build.
# Needs the `docs` extra (in `dev`: `bash scripts/setup.sh` installs it). Usage: scripts/build_docs.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/_build/html}
PY=${PYTHON:-.venv/bin/python}
DOCTREES="$(dirname "$OUT")/doctrees"  # Sphinx's parsed pages, beside the site (a clean build each time)
rm -rf "$OUT" "$DOCTREES"
"$PY" -m sphinx -W --keep-going -n -q -b html -d "$DOCTREES" docs "$OUT"
echo "Built $OUT/index.html"
