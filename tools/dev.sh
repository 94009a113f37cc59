#!/usr/bin/env bash
# Developer entry point: sets up the environment on first use, then runs a job.
#
#   bash tools/dev.sh test     # the test suite (+ ruff)
#   bash tools/dev.sh main     # the main job: mpnp prepare (once) + mpnp demo on SmolLM2
#   bash tools/dev.sh mpnp ... # any mpnp command inside the environment
#
# The virtual environment lives in $MPNP_VENV (default: .venv). It is (re)built when the
# dependency list (setup.cfg, pyproject.toml) changes; a stamp file records which one it has.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${MPNP_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
deps_key="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"

ensure_env() {
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.mpnp-deps" 2>/dev/null)" != "$deps_key" ]; then
    echo "[dev] building the environment in $venv (first run: several minutes)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
    "$venv/bin/python" -m pip install --quiet -e ".[model,dev,record]"
    echo "$deps_key" > "$venv/.mpnp-deps"
  else
    # Point the (possibly shared, cached) environment at this checkout; no downloads.
    "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null
  fi
}

cmd="${1:-test}"
shift || true
ensure_env
case "$cmd" in
  test)
    "$venv/bin/ruff" check .
    exec "$venv/bin/python" -m pytest -q "$@"
    ;;
  main)
    # The offline stage once (reused afterwards), then the demo on the embedded default.
    "$venv/bin/mpnp" prepare
    exec "$venv/bin/mpnp" demo "$@"
    ;;
  mpnp)
    exec "$venv/bin/mpnp" "$@"
    ;;
  *)
    echo "usage: bash tools/dev.sh test|main|mpnp ..." >&2
    exit 2
    ;;
esac
