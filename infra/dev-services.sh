#!/usr/bin/env bash
# fleetstream development services: NATS (with JetStream) and PostgreSQL.
#
#   bash infra/dev-services.sh ensure   # use what answers at NATS_URL / DATABASE_URL, else start it
#   bash infra/dev-services.sh status   # what answers, and whether it is ours
#   bash infra/dev-services.sh stop     # stop only what this script started
#
# `npm start` runs `ensure` first. If something already answers at the configured
# address it is used as is; otherwise, for loopback addresses only, the Debian
# package is installed if missing and a server is started with its data under
# .data/ (git-ignored). System services are never started, stopped or changed.
#
# Environment (same defaults as infra/config.ts):
#   NATS_URL      nats://127.0.0.1:4222
#   DATABASE_URL  postgres://postgres@127.0.0.1:5432/fleetstream
# and, for the nats-server it starts with nats.conf, the role passwords and NATS_MQTT_PORT
# from infra/dev.env (development values; the environment wins).
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=infra/dev.env
. infra/dev.env
REPO=$(pwd -P)
DATA="$REPO/.data"
NATS_DIR="$DATA/nats"
NATS_PID="$NATS_DIR/nats.pid"
NATS_LOG="$NATS_DIR/nats.log"
# Used when the postgres system user cannot reach $DATA (e.g. a repository under /root).
ALT_DIR="/var/tmp/fleetstream-$(printf '%s' "$REPO" | sha256sum | cut -c1-12)"

NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/fleetstream}

say() { printf 'dev-services: %s\n' "$*"; }
die() {
  printf 'dev-services: %s\n' "$@" >&2
  exit 1
}

# ---------------------------------------------------------------- addresses

# parse_url URL DEFAULT_PORT: sets URL_SCHEME, URL_HOST, URL_PORT.
# Accepts scheme://[user[:password]@]host[:port][/path][?query]; IPv6 hosts in brackets.
parse_url() {
  local url=$1 rest authority
  url=${url%%,*} # a NATS server list: the first entry decides
  [[ $url == *://* ]] || die "not a URL: '$url'"
  URL_SCHEME=${url%%://*}
  rest=${url#*://}
  authority=${rest%%[/?#]*}
  authority=${authority##*@} # drop user:password (the password may itself contain '@')
  if [[ $authority == \[* ]]; then
    URL_HOST=${authority%%]*}
    URL_HOST=${URL_HOST#[}
    rest=${authority#*]}
    URL_PORT=${rest#:}
  elif [[ $authority == *:* ]]; then
    URL_HOST=${authority%:*}
    URL_PORT=${authority##*:}
  else
    URL_HOST=$authority
    URL_PORT=
  fi
  [[ -n $URL_HOST ]] || URL_HOST=localhost # postgres:///db: libpq and node-postgres use localhost
  [[ -n $URL_PORT ]] || URL_PORT=$2
  if ! [[ $URL_PORT =~ ^[0-9]+$ ]] || ((URL_PORT < 1 || URL_PORT > 65535)); then
    die "bad port '$URL_PORT' in a $URL_SCHEME:// URL for host '$URL_HOST'"
  fi
}

is_loopback() { [[ $1 == 127.* || $1 == localhost || $1 == ::1 ]]; }

# host:port, with brackets for IPv6.
endpoint() { if [[ $1 == *:* ]]; then printf '[%s]:%s' "$1" "$2"; else printf '%s:%s' "$1" "$2"; fi; }

# shellcheck disable=SC2016 # $1/$2 expand in the inner shell, on purpose
reachable() { timeout 2 bash -c ': <"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null; }

wait_reachable() { # host port seconds
  local i
  for ((i = 0; i < $3 * 4; i++)); do
    reachable "$1" "$2" && return 0
    sleep 0.25
  done
  return 1
}

# NATS greets every client with an INFO line; JetStream servers say "jetstream":true.
nats_has_jetstream() {
  local line
  # shellcheck disable=SC2016
  line=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2" && IFS= read -r -t 2 line <&3 && printf "%s" "$line"' \
    _ "$1" "$2" 2>/dev/null) || return 2
  [[ $line == *'"jetstream":true'* ]]
}

# ---------------------------------------------------------------- packages

# as_root CMD...: run CMD as root, through sudo when needed.
as_root() {
  if ((EUID == 0)); then "$@"; else sudo "$@"; fi
}

can_be_root() { ((EUID == 0)) || command -v sudo >/dev/null; }

# apt_install PKG...: install, running apt-get update first only if the package lists are
# missing or stale.
apt_install() {
  local out status=0
  local -a apt=(as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=120)
  out=$(mktemp)
  say "installing Debian package(s): $*"
  "${apt[@]}" install -y --no-install-recommends "$@" 2>&1 | tee "$out" || status=$?
  if ((status != 0)) &&
    grep -Eq 'Unable to locate package|has no installation candidate|is not available|Failed to fetch' "$out"; then
    say "package lists missing or stale: running apt-get update"
    status=0
    { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "$@"; } || status=$?
  fi
  rm -f "$out"
  ((status == 0)) || die "apt-get install $* failed (status $status)"
}

pkg_installed() { [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]; }

nats_bin() {
  command -v nats-server 2>/dev/null || { [[ -x /usr/sbin/nats-server ]] && echo /usr/sbin/nats-server; }
}

# Newest installed PostgreSQL server's bin directory.
pg_bindir() {
  local d
  d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | while read -r d; do
    [[ -x $d/initdb && -x $d/pg_ctl ]] && echo "$d"
  done | tail -n1)
  [[ -n $d ]] && echo "$d"
}

install_nats() {
  if ! can_be_root; then
    die "nats-server is not installed and this needs root. As root, run:" \
      "  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nats-server" \
      "then run 'npm start' again."
  fi
  apt_install nats-server
  # The package enables and starts its own system service on systemd hosts, without
  # JetStream, on 127.0.0.1:4222. We installed it only for the binary: undo that.
  if [[ -d /run/systemd/system ]] && systemctl is-enabled --quiet nats-server 2>/dev/null; then
    say "disabling the nats-server system service the package just enabled (JetStream is off there);" \
      "re-enable with: systemctl enable --now nats-server"
    as_root systemctl disable --now --quiet nats-server || true
  fi
}

install_postgres() {
  local cc=/etc/postgresql-common/createcluster.conf
  if ! can_be_root; then
    die "the PostgreSQL server is not installed and this needs root. As root, run:" \
      "  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-common" \
      "  echo 'create_main_cluster = false' >> $cc   # no system cluster on port 5432" \
      "  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql" \
      "then run 'npm start' again."
  fi
  # Debian's postgresql package creates and starts a system cluster ("main", port 5432,
  # password auth over TCP) on first install. We only want the binaries, so turn that off
  # first, unless some cluster already exists or the admin already decided.
  pkg_installed postgresql-common || apt_install postgresql-common
  if [[ -z $(ls -A /etc/postgresql 2>/dev/null) ]] && ! grep -Eq '^[[:space:]]*create_main_cluster' "$cc" 2>/dev/null; then
    say "setting create_main_cluster = false in $cc (no system cluster is created)"
    echo 'create_main_cluster = false # fleetstream dev-services: binaries only' | as_root tee -a "$cc" >/dev/null
  fi
  apt_install postgresql
}

# ---------------------------------------------------------------- NATS

# pid of the project-local nats-server, if running.
nats_local_pid() {
  local pid
  [[ -f $NATS_PID ]] || return 1
  pid=$(<"$NATS_PID")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q nats-server || return 1
  echo "$pid"
}

# "host:port" the project-local nats-server was started with.
nats_local_endpoint() {
  local -a args
  local host='?' port='?' i
  mapfile -d '' args <"/proc/$1/cmdline" || true
  for ((i = 0; i < ${#args[@]} - 1; i++)); do
    case ${args[i]} in
      -a) host=${args[i + 1]} ;;
      -p) port=${args[i + 1]} ;;
    esac
  done
  endpoint "$host" "$port"
}

ensure_nats() {
  local host port bin pid
  parse_url "$NATS_URL" 4222
  host=$URL_HOST port=$URL_PORT
  local at
  at=$(endpoint "$host" "$port")
  if reachable "$host" "$port"; then
    say "NATS already reachable at $at"
    nats_has_jetstream "$host" "$port" || [[ $? == 2 ]] ||
      say "warning: the NATS server at $at does not have JetStream enabled; fleetstream needs it"
    return 0
  fi
  is_loopback "$host" ||
    die "NATS is not reachable at $at (from NATS_URL), and servers are only started for loopback addresses." \
      "Start it there, or unset NATS_URL to use a local one."
  [[ $URL_SCHEME == nats ]] ||
    die "NATS is not reachable at $at and NATS_URL uses '$URL_SCHEME://'; only plain nats:// servers are started here."
  if pid=$(nats_local_pid); then
    die "the project-local nats-server (pid $pid) is running at $(nats_local_endpoint "$pid"), not $at;" \
      "run 'bash infra/dev-services.sh stop' first."
  fi

  bin=$(nats_bin) || {
    install_nats
    bin=$(nats_bin) || die "nats-server is still missing after installing the package"
  }
  # Installing the package may have started a system server on this address after all.
  if reachable "$host" "$port"; then
    say "NATS now reachable at $at (started by the package installation); using it"
    return 0
  fi

  # Monitoring is on 127.0.0.1:8222 (nats.conf); if that is taken, e.g. by a second checkout,
  # use the client port + 4000 instead (nats-server exits when it cannot bind it).
  local -a monitor=()
  local mport=8222
  if reachable 127.0.0.1 8222; then
    mport=$((port + 4000))
    if ((mport > 65535)) || reachable 127.0.0.1 "$mport"; then
      die "the NATS monitoring port 8222 is in use and so is the fallback ($mport); free one of them"
    fi
    monitor=(-m "$mport")
  fi

  # MQTT devices connect at 127.0.0.1:NATS_MQTT_PORT (1883); if that is taken, e.g. by a
  # Mosquitto broker, use the client port + 10000 instead.
  local mqtt=$NATS_MQTT_PORT
  if reachable 127.0.0.1 "$mqtt"; then
    mqtt=$((port + 10000))
    if ((mqtt > 65535)) || reachable 127.0.0.1 "$mqtt"; then
      die "the MQTT port $NATS_MQTT_PORT is in use and so is the fallback ($mqtt); set NATS_MQTT_PORT to a free one"
    fi
  fi
  check_passwords

  mkdir -p "$NATS_DIR"
  rm -f "$NATS_PID"
  say "starting nats-server at $at (data: ${NATS_DIR#"$REPO"/}, log: ${NATS_LOG#"$REPO"/}," \
    "monitoring: http://127.0.0.1:$mport, MQTT: mqtt://127.0.0.1:$mqtt)"
  # JetStream data goes to .data/nats (NATS_STORE_DIR, not -sd: nats-server 2.9 cannot reload
  # a server started with -sd, and `fleetstream devices` reloads it). Users and passwords:
  # infra/nats/accounts.conf, with the passwords from the environment (infra/dev.env).
  # shellcheck disable=SC2094 # nats-server appends its log; early errors go to stderr
  NATS_MQTT_PORT=$mqtt NATS_STORE_DIR="\"$NATS_DIR\"" nohup setsid "$bin" -c nats.conf -a "$host" -p "$port" "${monitor[@]}" \
    -P "$NATS_PID" -l "$NATS_LOG" </dev/null >>"$NATS_LOG" 2>&1 &
  pid=$!
  local i
  for ((i = 0; i < 40; i++)); do
    reachable "$host" "$port" && break
    kill -0 "$pid" 2>/dev/null || break # exited: no point waiting
    sleep 0.25
  done
  if ! reachable "$host" "$port"; then
    tail -n 20 "$NATS_LOG" >&2 || true
    die "nats-server did not answer at $at within 10 s; see ${NATS_LOG#"$REPO"/}"
  fi
  say "NATS started at $at (pid $pid)"
}

# nats-server parses a variable's value as config: a password that is not a plain token would
# be cut short or refused (see infra/nats/accounts.conf).
check_passwords() {
  local v n
  for n in NATS_ADMIN_PASSWORD NATS_PROCESSOR_PASSWORD NATS_GATEWAY_PASSWORD NATS_SYSTEM_PASSWORD; do
    v=${!n}
    [[ $v =~ ^[A-Za-z][A-Za-z0-9_-]{11,}$ ]] ||
      die "'$n' must match /^[A-Za-z][A-Za-z0-9_-]{11,}\$/ (nats-server reads it as a config value), got a value of ${#v} characters that does not (not shown)"
  done
}

stop_nats() {
  local pid i
  if ! pid=$(nats_local_pid); then
    rm -f "$NATS_PID"
    say "no project-local nats-server running"
    return 0
  fi
  say "stopping project-local nats-server (pid $pid, $(nats_local_endpoint "$pid"))"
  kill -TERM "$pid"
  for ((i = 0; i < 40; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "nats-server did not exit within 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$NATS_PID"
}

# ---------------------------------------------------------------- PostgreSQL

# Postgres refuses to run as root: as root, run its tools as the postgres system user.
pg_as_owner() {
  if ((EUID == 0)); then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# Sets PG_PARENT (holds pg.log), PG_DATA and PG_SOCK for the project-local cluster.
pg_dirs() {
  PG_PARENT=$DATA
  if ((EUID == 0)); then
    id -u postgres >/dev/null 2>&1 || die "there is no 'postgres' system user (it comes with the postgresql package)"
    mkdir -p "$DATA"
    if ! runuser -u postgres -- test -x "$DATA" 2>/dev/null; then
      PG_PARENT=$ALT_DIR
    fi
  fi
  PG_DATA=$PG_PARENT/pg
  PG_SOCK=$PG_PARENT/pg-socket
  # The socket path must be short (~100 bytes) and survive pg_ctl's shell quoting.
  if ((${#PG_SOCK} > 80)) || [[ $PG_SOCK =~ [^A-Za-z0-9/._-] ]]; then
    PG_SOCK=$ALT_DIR/pg-socket
  fi
}

# The pg_dirs candidates that exist: .data/pg and the /var/tmp fallback.
pg_known_dirs() {
  local d
  for d in "$DATA/pg" "$ALT_DIR/pg"; do
    [[ -f $d/PG_VERSION ]] && echo "$d"
  done
  return 0
}

# pid and port of a running cluster in data dir $1 (from postmaster.pid).
pg_running() {
  local f=$1/postmaster.pid pid port
  [[ -f $f ]] || return 1
  pid=$(sed -n 1p "$f")
  port=$(sed -n 4p "$f")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid $port"
}

ensure_postgres() {
  local host port bin at running
  parse_url "$DATABASE_URL" 5432
  host=$URL_HOST port=$URL_PORT
  at=$(endpoint "$host" "$port")
  if reachable "$host" "$port"; then
    say "PostgreSQL already reachable at $at"
    return 0
  fi
  is_loopback "$host" ||
    die "PostgreSQL is not reachable at $at (from DATABASE_URL), and servers are only started for loopback addresses." \
      "Start it there, or unset DATABASE_URL to use a local one."

  bin=$(pg_bindir) || {
    install_postgres
    bin=$(pg_bindir) || die "initdb/pg_ctl are still missing after installing the postgresql package"
  }
  if reachable "$host" "$port"; then
    say "PostgreSQL now reachable at $at (started by the package installation); using it"
    return 0
  fi

  pg_dirs
  if running=$(pg_running "$PG_DATA"); then
    die "the project-local PostgreSQL (pid ${running% *}) is running on port ${running#* }, not $at;" \
      "run 'bash infra/dev-services.sh stop' first."
  fi
  if [[ $PG_PARENT != "$DATA" ]]; then
    say "the postgres user cannot reach $DATA, so the data directory is $PG_DATA"
  fi
  mkdir -p "$PG_PARENT" "$PG_DATA" "$PG_SOCK"
  if ((EUID == 0)); then
    chmod 700 "$PG_DATA"
    # A cluster made by an earlier non-root run belongs to that user.
    [[ $(stat -c %U "$PG_DATA") == postgres ]] || chown -R postgres:postgres "$PG_DATA"
    chown postgres:postgres "$PG_SOCK"
    touch "$PG_PARENT/pg.log"
    chown postgres:postgres "$PG_PARENT/pg.log"
  fi

  if [[ ! -f $PG_DATA/PG_VERSION ]]; then
    say "initialising a PostgreSQL cluster in $PG_DATA"
    local -a initdb=("$bin/initdb" -D "$PG_DATA" -A trust -U postgres -E UTF8)
    if ! pg_as_owner "${initdb[@]}" --locale=C.UTF-8 >"$PG_PARENT/initdb.log" 2>&1; then
      say "initdb with locale C.UTF-8 failed; retrying with --no-locale"
      pg_as_owner "${initdb[@]}" --no-locale >"$PG_PARENT/initdb.log" 2>&1 || {
        cat "$PG_PARENT/initdb.log" >&2
        die "initdb failed"
      }
    fi
  fi

  say "starting PostgreSQL at $at (data: $PG_DATA, log: $PG_PARENT/pg.log)"
  if ! pg_as_owner "$bin/pg_ctl" -w -t 30 -D "$PG_DATA" -l "$PG_PARENT/pg.log" \
    -o "-p $port -c listen_addresses=$host -k $PG_SOCK" start >/dev/null; then
    tail -n 20 "$PG_PARENT/pg.log" >&2 || true
    die "PostgreSQL did not start; see $PG_PARENT/pg.log"
  fi
  wait_reachable "$host" "$port" 10 || die "PostgreSQL started but does not answer at $at; see $PG_PARENT/pg.log"
  say "PostgreSQL started at $at (user postgres, no password; socket directory $PG_SOCK)"
}

stop_postgres() {
  local d running bin stopped=0
  while read -r d; do
    [[ -n $d ]] || continue
    running=$(pg_running "$d") || continue
    bin=$(pg_bindir) || die "pg_ctl not found; the project-local PostgreSQL (pid ${running% *}) is still running"
    say "stopping project-local PostgreSQL (pid ${running% *}, port ${running#* }, data $d)"
    pg_as_owner "$bin/pg_ctl" -w -D "$d" -m fast stop >/dev/null
    stopped=1
  done < <(pg_known_dirs)
  ((stopped)) || say "no project-local PostgreSQL running"
}

# ---------------------------------------------------------------- status

status() {
  local at pid d running ours
  parse_url "$NATS_URL" 4222
  at=$(endpoint "$URL_HOST" "$URL_PORT")
  ours=
  if pid=$(nats_local_pid); then
    if [[ $(nats_local_endpoint "$pid") == "$at" ]]; then
      ours=1
    else
      say "NATS: a project-local nats-server (pid $pid) runs at $(nats_local_endpoint "$pid")"
    fi
  fi
  if reachable "$URL_HOST" "$URL_PORT"; then
    if [[ -n $ours ]]; then
      say "NATS at $at: reachable, project-local (pid $pid, data ${NATS_DIR#"$REPO"/})"
    else
      say "NATS at $at: reachable, external (not started by this script)"
    fi
  else
    say "NATS at $at: not reachable"
  fi

  parse_url "$DATABASE_URL" 5432
  at=$(endpoint "$URL_HOST" "$URL_PORT")
  ours=
  while read -r d; do
    [[ -n $d ]] || continue
    running=$(pg_running "$d") || continue
    if [[ ${running#* } == "$URL_PORT" ]]; then
      ours="pid ${running% *}, data $d"
    else
      say "PostgreSQL: a project-local cluster (pid ${running% *}, data $d) runs on port ${running#* }"
    fi
  done < <(pg_known_dirs)
  if reachable "$URL_HOST" "$URL_PORT"; then
    if [[ -n $ours ]]; then
      say "PostgreSQL at $at: reachable, project-local ($ours)"
    else
      say "PostgreSQL at $at: reachable, external (not started by this script)"
    fi
  else
    say "PostgreSQL at $at: not reachable"
  fi
}

case ${1:-} in
  ensure)
    ensure_nats
    ensure_postgres
    ;;
  stop)
    stop_nats
    stop_postgres
    ;;
  status) status ;;
  *)
    echo "usage: bash infra/dev-services.sh ensure|stop|status" >&2
    exit 2
    ;;
esac
