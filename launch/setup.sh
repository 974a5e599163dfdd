#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs dfgm-jax with the tested
# versions of constraints.txt. Idempotent: reruns only when pyproject.toml or
# constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  PY=$(command -v python3.11 || command -v python3)
fi
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up .venv with $($PY --version) (a few minutes on a fresh machine)"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c constraints.txt -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
