#!/usr/bin/env bash
# Install the offline vLLM bundle into the workspace: `doit install` (extract ->
# patch-channels -> frozen-install), with no network. Safe to run again: the same bundle is a
# no-op, a new one replaces the environment atomically.
#
#   install-vllm-offline.sh [BUNDLE.tar]
#
# BUNDLE defaults to $AUTO_INFER_VLLM_BUNDLE_PATH; its sha256 comes from
# $AUTO_INFER_VLLM_BUNDLE_SHA256 or BUNDLE.tar.sha256 beside it.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$(readlink -f "$0")")/common.sh"

if [[ $# -gt 1 || "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
if [[ $# -eq 1 ]]; then
  export AUTO_INFER_VLLM_BUNDLE_PATH="$1"
fi
[[ -n "${AUTO_INFER_VLLM_BUNDLE_PATH:-}" ]] ||
  infer_die "no bundle: pass its path, or set AUTO_INFER_VLLM_BUNDLE_PATH"
[[ -f "$AUTO_INFER_VLLM_BUNDLE_PATH" ]] ||
  infer_die "bundle $AUTO_INFER_VLLM_BUNDLE_PATH does not exist (AUTO_INFER_VLLM_BUNDLE_PATH)"

infer_log "installing $AUTO_INFER_VLLM_BUNDLE_PATH into $AUTO_INFER_VLLM_PIXI_PROJECT_DIR"
exec "${DOIT[@]}" install
