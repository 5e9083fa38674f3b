#!/usr/bin/env bash
# Side venvs with older py-rattler releases, for tests/test_lock_older_pixi.py: each carries the
# rattler_lock of an older pixi, so reading our locks with it shows what that pixi reads.
#
#   scripts/setup-old-rattler.sh [--log FILE]
#
#   py-rattler 0.15.0 (rattler_lock 0.23.8, as in pixi 0.50): reads lock formats up to v6
#   py-rattler 0.26.0 (rattler_lock 0.32.7, as in pixi 0.76): reads v7
#
# Cached under ~/.cache/infer-vllm/py-rattler-<version>-venv (a few seconds once, then reused);
# pip installs from the configured index. Prints each venv's python.
set -euo pipefail
log=/dev/null
if [[ "${1:-}" == "--log" ]]; then
  log=$2
fi
cache="${XDG_CACHE_HOME:-$HOME/.cache}/infer-vllm"
mkdir -p "$cache"
for version in 0.15.0 0.26.0; do
  venv="$cache/py-rattler-$version-venv"
  if [[ ! -f "$venv/.ok" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv" >>"$log" 2>&1
    "$venv/bin/pip" install --disable-pip-version-check -q "py-rattler==$version" >>"$log" 2>&1 || {
      echo "setup-old-rattler.sh: pip install py-rattler==$version failed; see $log" >&2
      exit 1
    }
    touch "$venv/.ok"
  fi
  echo "$venv/bin/python"
done
