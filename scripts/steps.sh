# shellcheck shell=bash disable=SC2154  # log and say come from the caller
# Sourced by scripts/test.sh and scripts/cpu-demo.sh: one progress line per setup step on
# stderr, the step's own output (pip, apt) appended to "$log", and the log's last lines when
# a step fails. The caller sets `log` and defines `say`.

step() {
  local title=$1
  shift
  say "$title (output in $log)"
  if ! "$@" >>"$log" 2>&1; then
    say "failed: $title; the last lines of $log:"
    tail -n 15 "$log" >&2
    exit 1
  fi
}
