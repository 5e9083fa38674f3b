# shellcheck shell=bash
# Shared by the container scripts: where things live, and how to call the pipeline's doit.
# Every absolute path can be moved by a variable (the tests run everything in a temp root).

: "${INFER_SOFT_APP_ROOT:=/soft/app}"
: "${INFER_WORKSPACE_ROOT:=/hard/volume/workspace}"
# The pipeline checkout (this file is <home>/container/vllm/common.sh).
if [[ -z "${INFER_PIPELINE_HOME:-}" ]]; then
  INFER_PIPELINE_HOME="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)"
fi
export INFER_SOFT_APP_ROOT INFER_WORKSPACE_ROOT INFER_PIPELINE_HOME

# The container side only: extract, patch-channels, frozen-install, serve; never lock or pack.
export PIPELINE_ROLE=runtime
: "${PIPELINE_STATE_DIR:=$INFER_WORKSPACE_ROOT/.pipeline-state}"
: "${AUTO_INFER_VLLM_PIXI_PROJECT_DIR:=$INFER_WORKSPACE_ROOT/vllm-pixi-offline}"
: "${PIPELINE_PACK_CACHE:=$INFER_WORKSPACE_ROOT/.cache/pixi-pack}"
export PIPELINE_STATE_DIR AUTO_INFER_VLLM_PIXI_PROJECT_DIR PIPELINE_PACK_CACHE

# doit from the pipeline's venv when it has one, else from PATH.
if [[ -z "${INFER_PIPELINE_DOIT:-}" ]]; then
  if [[ -x "$INFER_PIPELINE_HOME/.venv/bin/doit" ]]; then
    INFER_PIPELINE_DOIT="$INFER_PIPELINE_HOME/.venv/bin/doit"
  else
    INFER_PIPELINE_DOIT="doit"
  fi
fi
# shellcheck disable=SC2034 # used by the scripts that source this file
DOIT=("$INFER_PIPELINE_DOIT" -f "$INFER_PIPELINE_HOME/dodo.py")

infer_log() { printf '%s %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >&2; }
infer_die() {
  infer_log "error: $*"
  exit 1
}
