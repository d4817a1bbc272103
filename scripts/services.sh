# shellcheck shell=bash
# Shared by start_all.sh and stop_all.sh (sourced, from the repository root): service names, where logs and PID
# files live, and how to tell a running service from a stale PID file.

LOG_DIR=${EMBED_LOG_DIR:-logs}  # tests point this at a temp dir
VENV=${VENV:-.venv}
export VENV

# The services, from their one registry (common/services.py, standard library only: no virtualenv needed yet):
# SERVICE_NAMES, and per service SERVICE_PORT_<name>, SERVICE_HOST_<name> (as the service reads them from this
# environment), SERVICE_SCRIPT_<name>, SERVICE_MODEL_VARIABLE_<name>, SERVICE_TINY_FOLDER_<name>.
declarations=$("${PYTHON:-python3}" -m common.services shell) || exit 1
eval "$declarations"

# The value of SERVICE_$1_$2 (e.g. service_value PORT siglip2).
service_value() {
  local variable="SERVICE_$1_$2"
  echo "${!variable}"
}

# The service named $1, or exit 2 on an unknown name.
check_service() {
  local name
  for name in "${SERVICE_NAMES[@]}"; do
    if [ "$name" = "$1" ]; then
      echo "$1"
      return
    fi
  done
  echo "unknown service '$1' (expected ${SERVICE_NAMES[*]})" >&2
  exit 2
}

pid_file() { echo "$LOG_DIR/$1.pid"; }

# Whether PID $1 is a live process of service $2, i.e. runs its script. A PID file can outlive its process and
# the PID can be reused by another program: that one must never be signalled.
is_service() {
  [[ "$(ps -p "$1" -o args= 2>/dev/null)" == *"$(service_value SCRIPT "$2")"* ]]
}

# The PID of service $1 when its PID file names a live process of it; fails otherwise.
service_pid() {
  local pid
  pid=$(cat "$(pid_file "$1")" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && is_service "$pid" "$1" && echo "$pid"
}
