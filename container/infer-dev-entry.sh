#!/usr/bin/env bash
# Boot hook of the infer-dev container: optional offline install of the vLLM bundle, then
# optional auto-serve, driven by environment variables. Call it from the container's
# entrypoint (or make it the ENTRYPOINT: with arguments, it runs them at the end with exec).
#
#   AUTO_INFER_VLLM_BUNDLE_ON_BOOT=1|true  and AUTO_INFER_VLLM_BUNDLE_PATH set -> doit install
#   AUTO_INFER_VLLM_MODEL_BUNDLES set (paths separated by ':')        -> doit install-model
#                                                  (into AUTO_INFER_VLLM_MODELS_DIR, /models)
#   AUTO_INFER_VLLM_ON_BOOT=1|true         and AUTO_INFER_VLLM_CONFIG exists  -> doit serve
#                                                                     (in the background)
#   AUTO_INFER_VLLM_STRICT=1|true   a failed step fails the hook (exit 1); by default it is
#                                   reported and the container's other services go on
#   AUTO_INFER_VLLM_BOOT_LOG        log file (default $INFER_WORKSPACE_ROOT/logs/auto-infer-vllm-boot.log)
#
# Flags take 1/true/yes/on or 0/false/no/off (any case) or empty; anything else is rejected
# with a message. It also links the helpers install-vllm-offline.sh and
# check-and-run-vllm.sh into $INFER_SOFT_APP_ROOT/vllm/ (default /soft/app/vllm/), and writes
# $INFER_WORKSPACE_ROOT/.auto-infer-vllm/clients.env (AUTO_INFER_LITELLM_BACKEND_BASE & co.)
# for other services once vLLM is up. Paths move with INFER_SOFT_APP_ROOT and
# INFER_WORKSPACE_ROOT.
set -uo pipefail
# shellcheck source=SCRIPTDIR/vllm/common.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/vllm/common.sh"

: "${AUTO_INFER_VLLM_BOOT_LOG:=$INFER_WORKSPACE_ROOT/logs/auto-infer-vllm-boot.log}"
helpers_dir="$INFER_SOFT_APP_ROOT/vllm"
clients_env="$INFER_WORKSPACE_ROOT/.auto-infer-vllm/clients.env"
failures=()

if ! mkdir -p "$(dirname "$AUTO_INFER_VLLM_BOOT_LOG")" 2>/dev/null ||
  ! touch "$AUTO_INFER_VLLM_BOOT_LOG" 2>/dev/null; then
  printf 'auto-infer-vllm: warning: cannot write %s; logging to stderr only\n' \
    "$AUTO_INFER_VLLM_BOOT_LOG" >&2
  AUTO_INFER_VLLM_BOOT_LOG=/dev/null
fi

say() {
  local line
  line="$(date '+%Y-%m-%d %H:%M:%S') auto-infer-vllm: $*"
  printf '%s\n' "$line" >&2
  printf '%s\n' "$line" >>"$AUTO_INFER_VLLM_BOOT_LOG"
}

# flag NAME: prints 1 or 0 for a boolean variable; returns 2 (with a message) for a bad value.
flag() {
  local name=$1 value
  value="${!name:-}"
  case "${value,,}" in
    1 | true | yes | on) echo 1 ;;
    "" | 0 | false | no | off) echo 0 ;;
    *)
      say "error: $name='$value' is not a flag: use 1/true or 0/false"
      return 2
      ;;
  esac
}

fail() {
  failures+=("$1")
  say "FAILED: $1 (details: $AUTO_INFER_VLLM_BOOT_LOG)"
  if [[ "$strict" == 1 ]]; then
    say "strict mode (AUTO_INFER_VLLM_STRICT): stopping the boot hook"
    exit 1
  fi
}

# Run a step with its output in the log; its last lines go to stderr when it fails.
run_step() {
  local title=$1
  shift
  say "$title: $*"
  if "$@" >>"$AUTO_INFER_VLLM_BOOT_LOG" 2>&1; then
    say "$title: done"
    return 0
  fi
  tail -n 15 "$AUTO_INFER_VLLM_BOOT_LOG" | sed 's/^/    /' >&2
  return 1
}

strict=$(flag AUTO_INFER_VLLM_STRICT) || strict=0
install_on=$(flag AUTO_INFER_VLLM_BUNDLE_ON_BOOT) || {
  fail "AUTO_INFER_VLLM_BUNDLE_ON_BOOT has a bad value; install skipped"
  install_on=0
}
serve_on=$(flag AUTO_INFER_VLLM_ON_BOOT) || {
  fail "AUTO_INFER_VLLM_ON_BOOT has a bad value; serve skipped"
  serve_on=0
}

# 1. the helpers, for manual use inside the container
if mkdir -p "$helpers_dir" 2>>"$AUTO_INFER_VLLM_BOOT_LOG"; then
  for helper in install-vllm-offline.sh check-and-run-vllm.sh; do
    ln -sfn "$INFER_PIPELINE_HOME/container/vllm/$helper" "$helpers_dir/$helper"
  done
  say "helpers linked in $helpers_dir"
else
  fail "cannot create $helpers_dir (INFER_SOFT_APP_ROOT)"
fi

# 2. offline install of the bundle
if [[ "$install_on" == 1 ]]; then
  if [[ -z "${AUTO_INFER_VLLM_BUNDLE_PATH:-}" ]]; then
    fail "AUTO_INFER_VLLM_BUNDLE_ON_BOOT is on but AUTO_INFER_VLLM_BUNDLE_PATH is not set"
  elif [[ ! -f "$AUTO_INFER_VLLM_BUNDLE_PATH" ]]; then
    fail "bundle $AUTO_INFER_VLLM_BUNDLE_PATH does not exist (AUTO_INFER_VLLM_BUNDLE_PATH)"
  elif ! run_step install "$helpers_dir/install-vllm-offline.sh"; then
    fail "offline install of $AUTO_INFER_VLLM_BUNDLE_PATH (the previous environment, if any, is untouched)"
  fi
else
  say "install skipped (AUTO_INFER_VLLM_BUNDLE_ON_BOOT is off)"
fi

# 2b. the model bundles, checked file by file, before anything serves them
if [[ -n "${AUTO_INFER_VLLM_MODEL_BUNDLES:-}" ]]; then
  if ! run_step models "${DOIT[@]}" install-model; then
    fail "installing the model bundles $AUTO_INFER_VLLM_MODEL_BUNDLES (each model that was installed before is untouched)"
  fi
else
  say "model install skipped (AUTO_INFER_VLLM_MODEL_BUNDLES is not set)"
fi

# 3. auto-serve, in the background so the container's other services go on
if [[ "$serve_on" == 1 ]]; then
  if [[ -z "${AUTO_INFER_VLLM_CONFIG:-}" ]]; then
    fail "AUTO_INFER_VLLM_ON_BOOT is on but AUTO_INFER_VLLM_CONFIG is not set"
  elif [[ ! -f "$AUTO_INFER_VLLM_CONFIG" ]]; then
    fail "serve config $AUTO_INFER_VLLM_CONFIG does not exist (AUTO_INFER_VLLM_CONFIG)"
  elif ! run_step serve "$helpers_dir/check-and-run-vllm.sh" "$AUTO_INFER_VLLM_CONFIG" --background; then
    fail "serving $AUTO_INFER_VLLM_CONFIG (see: doit status, doit logs NAME)"
  elif ! { mkdir -p "$(dirname "$clients_env")" &&
    run_step clients "${DOIT[@]}" clients --env-file "$clients_env"; }; then
    say "warning: could not write $clients_env"
  fi
else
  say "serve skipped (AUTO_INFER_VLLM_ON_BOOT is off)"
fi

if [[ ${#failures[@]} -gt 0 ]]; then
  say "boot hook finished with ${#failures[@]} failure(s); the container goes on"
else
  say "boot hook finished"
fi

if [[ $# -gt 0 ]]; then
  exec "$@"
fi
# Not strict: failures were reported; the entrypoint goes on with the other services.
exit 0
