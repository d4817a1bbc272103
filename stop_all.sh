#!/usr/bin/env bash
# Stop the services that start_all.sh started:  ./stop_all.sh [siglip2|qwen3]
# SIGTERM first (a service finishes the requests in flight, then exits), SIGKILL only after STOP_TIMEOUT seconds.
# Only a PID from $EMBED_LOG_DIR/<service>.pid (default logs/) that still runs that service is ever signalled; a
# stale PID file is just removed. Harmless when nothing runs.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/services.sh

STOP_TIMEOUT=${STOP_TIMEOUT:-40}  # a service gives in-flight requests up to 30 s

services=()
for arg in "$@"; do
  case $arg in
    -h | --help) sed -n '2,5p' "$0"; exit 0 ;;
    *) services+=("$(check_service "$arg")") ;;
  esac
done
[ ${#services[@]} -gt 0 ] || services=("${SERVICE_NAMES[@]}")

# Wait up to $3 seconds for PID $1 to stop being service $2.
wait_gone() {
  local deadline=$((SECONDS + $3))
  while is_service "$1" "$2"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# SIGTERM to every running service first, so that they drain in parallel; then wait for each.
stopping=()
for name in "${services[@]}"; do
  if pid=$(service_pid "$name"); then
    echo "$name: stopping PID $pid..."
    kill -TERM "$pid" 2> /dev/null || true
    stopping+=("$name:$pid")
  elif [ -f "$(pid_file "$name")" ]; then
    echo "$name: not running (removed a stale PID file)"
    rm -f "$(pid_file "$name")"
  else
    echo "$name: not running"
  fi
done
for entry in ${stopping[@]+"${stopping[@]}"}; do
  name=${entry%:*} pid=${entry#*:}
  if ! wait_gone "$pid" "$name" "$STOP_TIMEOUT"; then
    echo "$name: still running after ${STOP_TIMEOUT}s, sending SIGKILL to PID $pid" >&2
    kill -KILL "$pid" 2> /dev/null || true
    wait_gone "$pid" "$name" 10 || { echo "$name: PID $pid did not exit even after SIGKILL" >&2; exit 1; }
  fi
  rm -f "$(pid_file "$name")"
  echo "$name: stopped"
done
