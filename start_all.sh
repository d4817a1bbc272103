#!/usr/bin/env bash
# Start the embedding services in the background and wait until each answers /health.
#   ./start_all.sh              both: siglip2 (images + text, port 6010) and qwen3 (text, port 6011)
#   ./start_all.sh qwen3        only the one(s) named
#   ./start_all.sh --tiny       on tiny random-weight models: meaningless vectors, only for trying the API
# Settings come from the environment (SIGLIP2_MODEL, QWEN3_MODEL, SIGLIP2_PORT, QWEN3_PORT, EMBED_HOST, EMBED_...;
# python siglip2_embed.py --help lists them). A service that already runs is kept only if it is what this start asks for.
# Creates .venv on the first run. Logs and PID files go to $EMBED_LOG_DIR (default logs/). Stop: ./stop_all.sh
set -euo pipefail
cd "$(dirname "$0")"
source scripts/services.sh

START_TIMEOUT=${START_TIMEOUT:-900}  # seconds to wait for /health; a first start may download several GB

tiny=0
services=()
for arg in "$@"; do
  case $arg in
    --tiny) tiny=1 ;;
    -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
    -*)
      echo "unknown option '$arg': start_all.sh takes only --tiny and service names; settings go in environment" >&2
      echo "variables, e.g. SIGLIP2_PORT=7000 QWEN3_PORT=7001 ./start_all.sh (SIGLIP2_*/QWEN3_* for one service," >&2
      echo "EMBED_* for both; python siglip2_embed.py --help lists every variable)" >&2
      exit 2
      ;;
    *) services+=("$(check_service "$arg")") ;;
  esac
done
[ ${#services[@]} -gt 0 ] || services=("${SERVICE_NAMES[@]}")

scripts/ensure_venv.sh requirements.txt
mkdir -p "$LOG_DIR"

# The port of service $1: SIGLIP2_PORT, else EMBED_PORT, else its default (the registry reads them as the service).
port_of() { service_value PORT "$1"; }

# Where to reach service $1 from this machine (a wildcard bind address is reached over loopback).
url_of() {
  local host
  host=$(service_value HOST "$1")
  case $host in
    0.0.0.0 | "::" | "") host=127.0.0.1 ;;
    *:*) host="[$host]" ;;
  esac
  echo "http://$host:$(port_of "$1")"
}

# Tiny random-weight models, built once for each version of common/tiny_models.py; sets $tiny_dir.
build_tiny_models() {
  tiny_dir=.cache/tiny-models/$(sha256sum common/tiny_models.py | cut -c1-12)
  [ -d "$tiny_dir" ] && return
  echo "Building tiny random-weight models in $tiny_dir (once)..."
  local tmp="$tiny_dir.tmp.$$"
  if ! "$VENV/bin/python" -m common.tiny_models "$tmp" > "$LOG_DIR/tiny-models.log" 2>&1; then
    tail -n 20 "$LOG_DIR/tiny-models.log" >&2
    rm -rf "$tmp"
    exit 1
  fi
  if [ -d "$tiny_dir" ]; then rm -rf "$tmp"; else mv "$tmp" "$tiny_dir"; fi  # another start may have won
}

# Start service $1 in the background, unless it already runs; its PID goes to logs/$1.pid. Returns 0 when it was
# started, 3 when the same service already runs, 1 on failure (another service of that name runs, port taken).
start_service() {
  local name=$1 pid port
  port=$(port_of "$name")
  if pid=$(service_pid "$name"); then
    if [[ " $(ps -p "$pid" -o args=) " != *" --port $port "* ]]; then
      echo "$name: already running (PID $pid) on another port than $port; ./stop_all.sh $name stops it" >&2
      return 1
    fi
    # Same name and port; but is it the model, recipe and (non-)tiny weights this start asks for?
    "$VENV/bin/python" -m scripts.running_service "$name" "$(url_of "$name")" || return 1
    return 3
  fi
  if (: < "/dev/tcp/127.0.0.1/$port") 2> /dev/null; then
    echo "$name: port $port is already in use by $(port_holder "$port") (SIGLIP2_PORT / QWEN3_PORT choose others)" >&2
    return 1
  fi
  # The id this start gives the process: /health says it, so "ready" means this process answers, not another
  # program that took the port meanwhile.
  local instance
  instance="start_all-$$-$RANDOM$RANDOM"
  printf -v "instance_$name" %s "$instance"
  # logs/$name.log is the service's own rotated log; the console file catches what comes before logging is set
  # up (tracebacks at import time) and is truncated at each start. On failure, show only what this start logged.
  local size=0
  if [ -f "$LOG_DIR/$name.log" ]; then size=$(wc -c < "$LOG_DIR/$name.log"); fi
  printf -v "log_start_$name" %s "$((size))"
  nohup "$VENV/bin/python" "$(service_value SCRIPT "$name")" --port "$port" --log-file "$LOG_DIR/$name.log" --instance-id "$instance" \
    > "$LOG_DIR/$name.console.log" 2>&1 < /dev/null &
  echo $! > "$(pid_file "$name")"
}

# Who listens on TCP port $1 ("pid=123 (python3 ...)"), as far as this user may see it.
port_holder() {
  local users pid
  users=$(ss -Hltnp "( sport = :$1 )" 2> /dev/null | grep -o 'pid=[0-9]*' | head -n 1) || true
  pid=${users#pid=}
  if [ -n "$pid" ]; then
    echo "pid=$pid ($(ps -p "$pid" -o args= 2> /dev/null | cut -c1-80))"
  else
    echo "another program (ss -ltnp shows which)"
  fi
}

# One line "model=... device=..." once $1/health answers 200 from the process given the instance id $2; exit 1
# while nothing answers, 3 when another program answers there.
health() { "$VENV/bin/python" -m scripts.local_http health "$1" "$2"; }

# Say why service $1 did not start ($2) and show the end of its logs: of its own log, only what this start wrote.
report_failure() {
  local offset_var="log_start_$1"
  echo "$1: FAILED: $2" >&2
  echo "----- end of $LOG_DIR/$1.log -----" >&2
  tail -c "+$((${!offset_var:-0} + 1))" "$LOG_DIR/$1.log" 2> /dev/null | tail -n 25 >&2 || true
  if [ -s "$LOG_DIR/$1.console.log" ]; then
    echo "----- end of $LOG_DIR/$1.console.log -----" >&2
    tail -n 25 "$LOG_DIR/$1.console.log" >&2
  fi
}

# Poll /health of service $1 until it is ready, its process has died (fail at once) or START_TIMEOUT passes.
wait_ready() {
  local name=$1 url summary answered deadline=$((SECONDS + START_TIMEOUT)) instance_var="instance_$1"
  url=$(url_of "$name")
  while true; do
    answered=0
    summary=$(health "$url" "${!instance_var}") || answered=$?
    if [ "$answered" = 0 ]; then
      echo "$name: ready at $url  $summary"
      return
    fi
    if ! service_pid "$name" > /dev/null; then
      rm -f "$(pid_file "$name")"
      if [ "$answered" = 3 ]; then
        report_failure "$name" "the process exited, and $(port_holder "$(port_of "$name")") answers on its port"
      else
        report_failure "$name" "the process exited"
      fi
      return 1
    fi
    if ((SECONDS >= deadline)); then
      report_failure "$name" "not ready after ${START_TIMEOUT}s (still running; ./stop_all.sh $name stops it)"
      return 1
    fi
    sleep 1
  done
}

if [ "$tiny" = 1 ]; then
  build_tiny_models
  for name in "${SERVICE_NAMES[@]}"; do
    export "$(service_value MODEL_VARIABLE "$name")=$tiny_dir/$(service_value TINY_FOLDER "$name")"
  done
fi

failed=0
started=()
running=0
for name in "${services[@]}"; do
  status=0
  start_service "$name" || status=$?
  case $status in
    0) started+=("$name") ;;
    3) running=$((running + 1)) ;;
    *) failed=1 ;;
  esac
done
# Both load at the same time; then wait for each.
for name in ${started[@]+"${started[@]}"}; do
  if wait_ready "$name"; then running=$((running + 1)); else failed=1; fi
done

if [ "$running" = 0 ]; then
  exit 1
fi
if [ "$tiny" = 1 ]; then
  cat << 'EOF'

################################################################################################
#  --tiny: these services run TINY RANDOM-WEIGHT MODELS. Their vectors are MEANINGLESS noise,
#  only good for trying the API. Never index real data with them. Real models: see README.md.
################################################################################################
EOF
fi
echo "Logs: $LOG_DIR/   Stop: ./stop_all.sh"
exit "$failed"
