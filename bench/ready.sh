# Shared by the bench scripts: wait_ready URL PID LOG [SECONDS] waits until
# a server answers URL (its /readyz; https is not verified), at most
# SECONDS (default 20), giving up early when process PID is gone. On
# failure it names the log to read and returns 1. Source it.
wait_ready() {
  local url=$1 pid=$2 log=$3 tries=$(( ${4:-20} * 5 ))
  for _ in $(seq 1 "$tries"); do
    curl -sfk "$url" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  echo "$(basename "$0"): the server at $url did not become ready (see $log)" >&2
  return 1
}
