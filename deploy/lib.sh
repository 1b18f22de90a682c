# Shared by the deploy scripts (sourced, not run): where the stack lives and how to reach
# supervisord, HAProxy's runtime API and the workers.

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
var="${SCALECHAT_VAR:-$root/var}"
script="$(basename "$0")"

say() { echo "$script: $*"; }
die() { echo "$script: $*" >&2; exit 1; }

load_stack() {
  [ -f "$var/stack.env" ] || die "no $var/stack.env: run deploy/configure or make run first"
  set -a
  # shellcheck disable=SC1091
  . "$var/stack.env"
  set +a
}

ctl() {
  "$root/.venv/bin/supervisorctl" -c "$root/supervisord.conf" \
    -s "unix://$var/run/supervisor.sock" "$@"
}

supervisord_pid() {
  local pid
  pid="$(cat "$var/run/supervisord.pid" 2>/dev/null)" || return 1
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# One command to HAProxy's runtime API; prints its answer.
haproxy_api() {
  echo "$*" | socat -t 5 stdio "unix-connect:$var/run/haproxy.sock"
}

# The `show stat` field $2 (e.g. scur, status) of server $1 in backend `workers`.
server_stat() {
  haproxy_api "show stat" | awk -F, -v server="$1" -v field="$2" '
    NR == 1 { sub(/^# /, ""); for (i = 1; i <= NF; i++) column[$i] = i; next }
    $1 == "workers" && $2 == server { print $column[field] }'
}

program_running() { ctl status "$1" 2>/dev/null | grep -q ' RUNNING '; }

worker_name() { printf 'worker-%02d' "$1"; }
worker_port() { echo $((WORKER_PORT_BASE + $1)); }

http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds, or fail naming WHAT.
wait_for() {
  local seconds="$1" what="$2" deadline
  shift 2
  deadline=$((SECONDS + seconds))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "$script: gave up after ${seconds}s waiting for $what" >&2; return 1; }
    sleep 0.2
  done
}
