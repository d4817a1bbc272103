# shellcheck shell=bash
# Shared by start_all.sh and stop_all.sh (sourced, from the repository root): service names, where logs and PID
# files live, and how to tell a running service from a stale PID file.

LOG_DIR=${EMBED_LOG_DIR:-logs}  # tests point this at a temp dir
VENV=${VENV:-.venv}
export VENV

# The service named $1, or exit 2 on an unknown name.
check_service() {
  case $1 in
    siglip2 | qwen3) echo "$1" ;;
    *) echo "unknown service '$1' (expected siglip2 or qwen3)" >&2; exit 2 ;;
  esac
}

pid_file() { echo "$LOG_DIR/$1.pid"; }

# Whether PID $1 is a live process of service $2, i.e. runs $2_embed.py. A PID file can outlive its process and
# the PID can be reused by another program: that one must never be signalled.
is_service() {
  [[ "$(ps -p "$1" -o args= 2>/dev/null)" == *"$2_embed.py"* ]]
}

# The PID of service $1 when its PID file names a live process of it; fails otherwise.
service_pid() {
  local pid
  pid=$(cat "$(pid_file "$1")" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && is_service "$pid" "$1" && echo "$pid"
}
