# Shared by the deploy scripts (sourced, not run): messages, where the stack lives, its settings
# and how to reach supervisord, HAProxy's runtime API and the workers.

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
var="${SCALECHAT_VAR:-$root/var}"
script="$(basename "$0")"

say() { echo "$script: $*"; }
die() { echo "$script: $*" >&2; exit 1; }
# a wrong command line: the reason, then the usage (each script defines `usage`)
usage_error() { echo "$script: $*" >&2; usage >&2; exit 2; }
# a setting that cannot be read (a malformed address, list or role): exit 2, as a wrong command line
bad_setting() { echo "$script: $*" >&2; exit 2; }

# var/stack.env holds one KEY=VALUE a line after this header, read literally: a value is never
# evaluated, so it may hold quotes, $(...), backticks or spaces (not a newline).
stack_env_header="# scalechat settings written by deploy/configure: KEY=VALUE a line, read literally, never sourced"

# read_stack_env FILE CALLBACK: run `CALLBACK KEY VALUE` for each setting in FILE.
read_stack_env() {
  local file="$1" callback="$2" line key value quoted=1 n=0
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    # files written before the literal format quoted every value in ''
    [ "$n" = 1 ] && [ "$line" = "$stack_env_header" ] && quoted=0
    case "$line" in ''|'#'*) continue ;; esac
    key="${line%%=*}"
    value="${line#*=}"
    [[ "$line" == *=* && "$key" =~ ^[A-Z_][A-Z0-9_]*$ ]] || die "$file line $n is not KEY=VALUE"
    if [ "$quoted" = 1 ]; then value="${value#\'}"; value="${value%\'}"; fi
    "$callback" "$key" "$value"
  done < "$file"
}

export_setting() { export "$1=$2"; }

load_stack() {
  [ -f "$var/stack.env" ] || die "no $var/stack.env: run deploy/configure or make run first"
  read_stack_env "$var/stack.env" export_setting
}

ctl() {
  "$root/.venv/bin/supervisorctl" -c "$root/supervisord.conf" \
    -s "unix://$var/run/supervisor.sock" "$@"
}

# A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the PID it names
# one process, where a PID alone may have been reused by another since it was recorded.
start_time() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"  # the command name in () may hold spaces
  read -ra fields <<<"$stat"
  echo "${fields[19]}"
}

# The PID of this stack's supervisord: the pid file names a live supervisord reading our
# supervisord.conf (a stale pid file may name whatever process got that PID since).
supervisord_pid() {
  local pid command
  pid="$(cat "$var/run/supervisord.pid" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  command="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$command" == *supervisord*"-c $root/supervisord.conf"* ]] && echo "$pid"
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

# The master name the embedded Sentinels watch (REDIS_TOPOLOGY=sentinel).
sentinel_service=scalechat

# The embedded Redis Cluster (REDIS_TOPOLOGY=cluster): nodes redis-0..5 on REDIS_PORT to +5.
cluster_nodes=6
embedded_cluster() { [ -z "$EXTERNAL_REDIS_URL" ] && [ "$REDIS_TOPOLOGY" = cluster ] && [ "$WORKERS" != 0 ]; }
# cluster_cli HOST:PORT ARGS...: redis-cli to one cluster node, with the stack's password
cluster_cli() { redis_cli -h "${1%:*}" -p "${1##*:}" "${@:2}"; }
# cluster_info_field HOST:PORT FIELD: one field of the node's CLUSTER INFO (empty if it does not answer)
cluster_info_field() {
  cluster_cli "$1" cluster info 2>/dev/null </dev/null | tr -d '\r' | sed -n "s/^$2://p"
}
# cluster_addresses FIRST_PORT: the nodes' addresses, one a line, in the order that
# `redis-cli --cluster create` reads them (it makes the first three masters).
cluster_addresses() {
  local n
  for ((n = 0; n < cluster_nodes; n++)); do echo "127.0.0.1:$(($1 + n))"; done
}

# redis-cli with the password of REDIS_PASSWORD (never on the command line), bounded in time.
redis_cli() { REDISCLI_AUTH="${redis_password:-${REDIS_PASSWORD:-}}" timeout 5 redis-cli --no-auth-warning "$@"; }
# redis-cli to a Sentinel, which takes no password.
sentinel_cli() { env -u REDISCLI_AUTH timeout 5 redis-cli "$@"; }

# read_sentinel_url URL: when URL names a Sentinel set, set `sentinels` (host:port ...),
# `sentinel_name`, `redis_user` and `redis_password` as the workers read them
# (flask_app/redis/urls.py); return 1 for a direct URL.
read_sentinel_url() {
  local parsed
  parsed="$("$root/.venv/bin/python" -c '
import sys
from flask_app.redis.urls import SentinelURL, parse_url
target = parse_url(sys.argv[1])
if isinstance(target, SentinelURL):
    print(target.service, target.username or "", target.password or "", sep="\n")
    print(" ".join(f"{host}:{port}" for host, port in target.sentinels))
' "$1")" || die "REDIS_URL is not a Redis URL scalechat reads (see docs/operations.md)"
  [ -n "$parsed" ] || return 1
  { IFS= read -r sentinel_name; IFS= read -r redis_user; IFS= read -r redis_password
    read -ra sentinels; } <<<"$parsed"
}

# read_cluster_url URL: when URL names a Redis Cluster (redis+cluster://), set `cluster_seeds`
# (host:port ...), `redis_user` and `redis_password` as the workers read them; return 1 otherwise.
read_cluster_url() {
  local parsed
  parsed="$("$root/.venv/bin/python" -c '
import sys
from flask_app.redis.urls import ClusterURL, parse_url
target = parse_url(sys.argv[1])
if isinstance(target, ClusterURL):
    print(target.username or "", target.password or "", sep="\n")
    print(" ".join(f"{host}:{port}" for host, port in target.nodes))
' "$1")" || die "REDIS_URL is not a Redis URL scalechat reads (see docs/operations.md)"
  [ -n "$parsed" ] || return 1
  { IFS= read -r redis_user; IFS= read -r redis_password; read -ra cluster_seeds; } <<<"$parsed"
}

# sentinel_master: print "HOST PORT" of the master, as the first Sentinel that answers names it.
sentinel_master() {
  local address answer
  for address in "${sentinels[@]}"; do
    answer="$(sentinel_cli -h "${address%:*}" -p "${address##*:}" --raw \
              SENTINEL get-master-addr-by-name "$sentinel_name" 2>/dev/null)" || continue
    answer="$(tr '\n' ' ' <<<"$answer")"
    [[ "$answer" =~ ^[^\ ]+\ [0-9]+\ $ ]] && { echo "${answer% }"; return 0; }
  done
  return 1
}

program_running() { ctl status "$1" 2>/dev/null | grep -q ' RUNNING '; }

worker_name() { printf 'worker-%02d' "$1"; }
worker_port() { echo $((WORKER_PORT_BASE + $1)); }

# Where this host's programs are reached from the host itself: a wildcard bind (0.0.0.0, *, ::)
# answers on loopback; an IPv6 address goes in [] in a URL.
reach_address() {
  case "$1" in 0.0.0.0|'*'|'') echo 127.0.0.1 ;; ::|'[::]') echo ::1 ;; *) echo "$1" ;; esac
}
url_host() { if [[ "$1" == *:* ]]; then echo "[$1]"; else echo "$1"; fi; }
worker_address() { reach_address "${WORKER_HOST:-127.0.0.1}"; }
worker_url() { echo "http://$(url_host "$(worker_address)"):$(worker_port "$1")"; }
proxy_url() { echo "http://$(url_host "$(reach_address "$PUBLIC_BIND")"):$PORT"; }
# This host's roles (deploy/configure): HAProxy runs unless PROXY_SERVERS=none; its backend
# is this host's workers unless PROXY_SERVERS lists other hosts' workers.
runs_proxy() { [ "${SCALECHAT_PROXY_PROCS:-1}" = 1 ]; }
proxies_local_workers() { runs_proxy && [ "${PROXY_SERVERS:-local}" = local ]; }

http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

port_taken() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }  # PORT [ADDRESS]

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

# sentinel_replica: print "HOST PORT" of a replica whose link to its master is up, as the first
# Sentinel that answers lists them.
sentinel_replica() {
  local address key value ip="" port="" flags="" link=""
  for address in "${sentinels[@]}"; do
    while IFS= read -r key && IFS= read -r value; do
      case "$key" in
        name) ip="" port="" flags="" link="" ;;
        ip) ip="$value" ;;
        port) port="$value" ;;
        flags) flags="$value" ;;
        master-link-status) link="$value" ;;
      esac
      if [ -n "$ip" ] && [ -n "$port" ] && [ "$flags" = slave ] && [ "$link" = ok ]; then
        echo "$ip $port"
        return 0
      fi
    done < <(sentinel_cli -h "${address%:*}" -p "${address##*:}" --raw \
               SENTINEL replicas "$sentinel_name" 2>/dev/null)
  done
  return 1
}

# The Redis that deploy/backup copies from, as "HOST PORT" (its password: REDIS_PASSWORD): the
# embedded Redis; with Sentinel, a replica whose link to its master is up (so that the backup's
# fork and copy load a replica and never the master), else the master. Fails when the stack's
# Redis is external (REDIS_URL): that one is backed up where it runs.
backup_redis() {
  if [ "$SCALECHAT_REDIS_PROCS" = 1 ]; then
    echo "127.0.0.1 $REDIS_PORT"
  elif [ -z "$EXTERNAL_REDIS_URL" ] && read_sentinel_url "$REDIS_URL"; then
    sentinel_replica || sentinel_master
  else
    return 1
  fi
}
