#!/usr/bin/env bash
# Check the serve config, then start its vLLM instances: `doit plan --check`, then
# `doit serve`. Already serving the same plan: says so and exits 0.
#
#   check-and-run-vllm.sh [CONFIG.toml] [--foreground|--background]
#
# CONFIG defaults to $AUTO_INFER_VLLM_CONFIG. Background (the default of the config) returns
# once every instance is ready or failed; --foreground blocks (use it as a container's main
# process: exec check-and-run-vllm.sh --foreground).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$(readlink -f "$0")")/common.sh"

mode=()
config="${AUTO_INFER_VLLM_CONFIG:-}"
for arg in "$@"; do
  case "$arg" in
    --foreground | --background) mode=("$arg") ;;
    -h | --help)
      sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -*) infer_die "unknown option $arg (allowed: --foreground, --background)" ;;
    *) config="$arg" ;;
  esac
done
[[ -n "$config" ]] || infer_die "no serve config: pass its path, or set AUTO_INFER_VLLM_CONFIG"
[[ -f "$config" ]] || infer_die "serve config $config does not exist (AUTO_INFER_VLLM_CONFIG)"
export AUTO_INFER_VLLM_CONFIG="$config"

infer_log "checking $config"
"${DOIT[@]}" plan --check >/dev/null
infer_log "starting the instances of $config"
"${DOIT[@]}" serve "${mode[@]}"
