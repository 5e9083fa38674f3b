#!/usr/bin/env bash
# The tests in one command, on a fresh machine: sets up what they need, then runs pytest.
#
#   scripts/test.sh [PYTEST_ARGS...]   e.g. scripts/test.sh -m "not slow"; scripts/test.sh tests/test_demo.py
#   scripts/test.sh --setup            steps 1-4 only (.ci/run: set up, lint, then test)
#
# 1. shellcheck (tests/test_container.py runs it) and ssh-keygen (OpenSSH: the bundle signature
#    tests): apt-get installs them when missing and root
# 2. the project venv .venv with the pipeline and its test extra (skipped when up to date)
# 3. the real vLLM bundle for the real-server tests, packed and installed by the pipeline
#    itself (scripts/setup-vllm-bundle.sh; several minutes once, then reused from
#    ~/.cache/infer-vllm/vllm-env-<bundle sha256>)
# 4. older py-rattler side venvs for tests/test_lock_older_pixi.py (scripts/setup-old-rattler.sh;
#    seconds once, then reused from ~/.cache/infer-vllm)
# 5. .venv/bin/python -m pytest "$@"; its exit status is this script's
#
# Setup output (pip, apt) goes to .venv/setup.log; the terminal gets one line per step.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

say() { printf 'test.sh: %s\n' "$*" >&2; }
mkdir -p .venv
log="$PWD/.venv/setup.log"
: >"$log"
# shellcheck source=scripts/steps.sh
source scripts/steps.sh

missing=()
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    step "installing ${missing[*]}" sh -c "apt-get update -qq && apt-get install -y -qq ${missing[*]}"
  else
    say "warning: ${missing[*]} missing (and this is not root with apt-get): their tests will fail"
  fi
fi

# The installed project is current when pyproject.toml is older than the stamp pip leaves.
stamp=.venv/.infer-vllm-test-deps
if [[ ! -x .venv/bin/python ]]; then
  step "creating the project venv (.venv)" python3 -m venv .venv
fi
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  step "installing the pipeline with its test extra into .venv" \
    .venv/bin/pip install --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi

scripts/setup-vllm-bundle.sh --log "$log" >/dev/null
step "older py-rattler side venvs (scripts/setup-old-rattler.sh)" scripts/setup-old-rattler.sh --log "$log"
if [[ "${1:-}" == "--setup" ]]; then
  say "set up; run the tests with scripts/test.sh [PYTEST_ARGS...]"
  exit 0
fi

# The slow tests write up to 6 GB at once under the temp dir (the CPU demo); with less room
# they fail on ENOSPC halfway through, so say it first.
free_kb=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR == 2 {print $4}')
if [[ -n "$free_kb" && "$free_kb" -lt $((10 * 1024 * 1024)) ]]; then
  say "warning: only $((free_kb / 1024)) MiB free under ${TMPDIR:-/tmp}; the slow tests need about 10 GiB"
fi
say "running: python -m pytest $*"
exec .venv/bin/python -m pytest "$@"
