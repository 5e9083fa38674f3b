#!/usr/bin/env bash
# Turn merged.env into `docker run` flags: ports, GPUs, the workspace volume, the models
# folder (read-only at /models), and the boot variables. Prints the command (one flag per line) by default; --exec runs it.
#
#   run-merged.sh [--env-file FILE] [--exec] IMAGE [COMMAND...]
#
# Variables already set in the caller's environment win over merged.env. Secrets (API keys)
# are passed by name (-e NAME), so their values never appear on the docker command line.
# No Docker engine runs on the build machines of this project: this script is tested for the
# flags it prints, not for a running container.
set -euo pipefail

here="$(dirname "$(readlink -f "$0")")"
env_file="$here/merged.env"
run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --env-file)
      env_file="$2"
      shift 2
      ;;
    --exec)
      run=1
      shift
      ;;
    -h | --help)
      sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -*)
      printf 'run-merged.sh: error: unknown option %s\n' "$1" >&2
      exit 2
      ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  printf 'run-merged.sh: error: no image given (usage: run-merged.sh [--exec] IMAGE [COMMAND...])\n' >&2
  exit 2
fi
[[ -f "$env_file" ]] || {
  printf 'run-merged.sh: error: %s does not exist\n' "$env_file" >&2
  exit 2
}
# shellcheck source=SCRIPTDIR/merged.env
source "$env_file"

: "${INFER_CONTAINER_NAME:=infer-dev}"
: "${INFER_WORKSPACE_ROOT:=/hard/volume/workspace}"
: "${INFER_HOST_WORKSPACE:=$INFER_WORKSPACE_ROOT}"
: "${INFER_GPUS:=all}"

# --init: an init as PID 1 reaps orphans, whatever the image's entrypoint (docs/container.md).
args=(docker run -d --init --name "$INFER_CONTAINER_NAME" --restart unless-stopped)
[[ -n "$INFER_GPUS" && "$INFER_GPUS" != none ]] && args+=(--gpus "$INFER_GPUS")
for pair in $RUN_PORTS; do
  if [[ ! "$pair" =~ ^([0-9.]+:)?[0-9]+:[0-9]+(/(tcp|udp))?$ ]]; then
    printf 'run-merged.sh: error: RUN_PORTS entry %q is not host:container\n' "$pair" >&2
    exit 2
  fi
  args+=(-p "$pair")
done
args+=(-v "$INFER_HOST_WORKSPACE:$INFER_WORKSPACE_ROOT")
# Read-only: vLLM only reads weights, and a serve config must not be able to change them.
[[ -n "$INFER_HOST_MODELS" && "$INFER_HOST_MODELS" != none ]] &&
  args+=(-v "$INFER_HOST_MODELS:/models:ro")
for name in AUTO_INFER_VLLM_BUNDLE_ON_BOOT AUTO_INFER_VLLM_BUNDLE_PATH AUTO_INFER_VLLM_ON_BOOT \
  AUTO_INFER_VLLM_CONFIG; do
  args+=(-e "$name=${!name}")
done
# Everything else the pipeline reads, by name only (values stay out of argv): set ones only.
while IFS='=' read -r name _; do
  case "$name" in
    AUTO_INFER_VLLM_BUNDLE_ON_BOOT | AUTO_INFER_VLLM_BUNDLE_PATH | AUTO_INFER_VLLM_ON_BOOT | \
      AUTO_INFER_VLLM_CONFIG) ;;
    AUTO_INFER_* | PIPELINE_* | VLLM_API_KEY*) args+=(-e "$name") ;;
  esac
done < <(env | LC_ALL=C sort)
args+=("$@")

if [[ "$run" == 1 ]]; then
  exec "${args[@]}"
fi
# One flag and its value per line: readable, and still a valid command to copy.
line="${args[0]} ${args[1]}"
for ((i = 2; i < ${#args[@]}; i++)); do
  printf '%s \\\n' "$line"
  line="  $(printf '%q' "${args[i]}")"
  if [[ "${args[i]}" == -* && $((i + 1)) -lt ${#args[@]} && "${args[i + 1]}" != -* ]]; then
    i=$((i + 1))
    line+=" $(printf '%q' "${args[i]}")"
  fi
done
printf '%s\n' "$line"
