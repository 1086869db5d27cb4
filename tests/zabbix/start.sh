#!/usr/bin/env bash
# Throwaway Zabbix 6.0 API server (Debian packages zabbix-frontend-php + zabbix-server-pgsql,
# php-cli, php-pgsql, postgresql) on 127.0.0.1, one instance per <workdir>, for
# tests/provider_zabbix.rs and tests/e2e_zabbix.rs (tests/common/zabbix_server.rs runs it).
# The zabbix_server daemon is not needed: the API is the PHP frontend.
#
#   start.sh <workdir> <pg_port> <http_port>
#
# On success prints KEY=VALUE lines to stdout (ZBX_URL, ZBX_PHP_PID, ZBX_PG_PID, ...) and also
# writes them to <workdir>/instance.env.  Tear down with:  <workdir>/stop.sh [--rm]
#
# Environment knobs (all optional):
#   ZBX_GOLDEN=/path   cache of a fully loaded, cleanly stopped cluster. Built on first use
#                      (flock-protected, safe for parallel callers), then every instance is a
#                      plain `cp -a` of it: ~1 s instead of ~5 s per instance.
#   ZBX_PHP_WORKERS=N  PHP_CLI_SERVER_WORKERS for `php -S` (default 4; 1 = strictly serial).
#   PGBIN, PG_OS_USER (default postgres, only used when running as root), ZBX_SQL_DIR, ZBX_UI_DIR.
#
# How the per-instance config works: Debian's frontend hard-codes
#   CConfigFile::CONFIG_FILE_PATH = '/etc/zabbix/zabbix.conf.php'
# (no env var, no docroot-relative lookup).  CConfigFile is only ever loaded through the
# autoloader, so we generate <workdir>/CConfigFile.php (a copy with the constant pointing to
# <workdir>/zabbix.conf.php) and load it with `php -d auto_prepend_file=...`.  The autoloader then
# never loads the original.  /etc/zabbix and /usr/share/zabbix are not touched.
set -euo pipefail

if [ $# -ne 3 ]; then echo "usage: $0 <workdir> <pg_port> <http_port>" >&2; exit 2; fi
W=$1 PG_PORT=$2 HTTP_PORT=$3
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)}
SQL_DIR=${ZBX_SQL_DIR:-/usr/share/zabbix-server-pgsql}
UI_DIR=${ZBX_UI_DIR:-/usr/share/zabbix}
GOLDEN=${ZBX_GOLDEN:-}
WORKERS=${ZBX_PHP_WORKERS:-4}

T0=$(date +%s%N)
ms() { echo $(( ($(date +%s%N) - T0) / 1000000 )); }
log() { echo "[zbx-start +$(ms)ms] $*" >&2; }

mkdir -p "$W"
W=$(cd "$W" && pwd)
[ -e "$W/pg" ] && { echo "$W/pg already exists; use a fresh workdir" >&2; exit 1; }

if [ "$(id -u)" = 0 ]; then
  PG_OS_USER=${PG_OS_USER:-postgres}
  as_pg() { runuser -u "$PG_OS_USER" -- "$@"; }
  own() { chown "$PG_OS_USER:" "$@"; }
  chmod 755 "$W"   # the postgres user must be able to traverse into the workdir
else
  as_pg() { "$@"; }
  own() { :; }
fi

RUN=$W/run                      # unix socket dir + postgres log (owned by the pg user)
mkdir -p "$RUN"; own "$RUN"
if ! as_pg test -w "$RUN"; then
  echo "postgres OS user cannot write $RUN (a parent directory is not traversable?)" >&2; exit 1
fi

# on any failure: stop whatever this script started (php, postgres) and leave the dir for inspection
cleanup_on_error() {
  [ -n "${PHP_PID:-}" ] && kill -TERM -- -"$PHP_PID" 2>/dev/null
  for d in "$W/pg" "${tmp:-}"; do
    [ -n "$d" ] && [ -f "$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
  done
  echo "zbx-start FAILED; logs in $W (php.log, run/postgres.log)" >&2
}
trap 'rc=$?; [ $rc -ne 0 ] && cleanup_on_error; exit $rc' EXIT

if (exec 3<>"/dev/tcp/127.0.0.1/$PG_PORT") 2>/dev/null; then
  echo "pg port $PG_PORT is already in use" >&2; exit 1
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT") 2>/dev/null; then
  echo "http port $HTTP_PORT is already in use" >&2; exit 1
fi

PG_OPTS="-c listen_addresses=127.0.0.1 -p $PG_PORT -k $RUN -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_wal_size=1GB -c checkpoint_timeout=1h"

pg_start() { # <datadir>
  as_pg "$PGBIN/pg_ctl" -D "$1" -l "$RUN/postgres.log" -w -t 60 -o "$PG_OPTS" start >/dev/null
}

# The SQL is sent as ONE simple-query message per file through php-pgsql: psql sends each of the
# ~173k INSERTs of data.sql as its own round trip (~15 s); one message takes ~4 s, and ~3 s with
# FK/user triggers skipped (session_replication_role=replica).  The only user triggers in the 6.0
# schema maintain hosts.name_upper / items.name_upper, which are fixed up afterwards (verified:
# data-only dump identical to a plain psql load).
LOADER='$c = pg_connect($argv[1]); if (!$c) exit(1);
pg_query($c, "SET session_replication_role = replica");
foreach (array_slice($argv, 2) as $f) {
  if (!@pg_query($c, gzdecode(file_get_contents($f)))) { fwrite(STDERR, "$f: ".pg_last_error($c)); exit(1); }
}
if (!@pg_query($c, "UPDATE hosts SET name_upper=upper(name) WHERE name_upper<>upper(name);
                    UPDATE items SET name_upper=upper(name) WHERE name_upper<>upper(name);")) exit(1);
'

build_cluster() { # <datadir>: initdb + start + create/load db `zabbix`; leaves it running
  local d=$1
  mkdir -p "$d"; own "$d"; chmod 700 "$d"
  as_pg "$PGBIN/initdb" -D "$d" -U zabbix -A trust -E UTF8 --locale=C.UTF-8 -N >/dev/null
  log "initdb done"
  pg_start "$d"
  log "postgres up"
  as_pg "$PGBIN/createdb" -h "$RUN" -p "$PG_PORT" -U zabbix -E UTF8 -T template0 zabbix
  php -r "$LOADER" "host=127.0.0.1 port=$PG_PORT user=zabbix dbname=zabbix" \
      "$SQL_DIR/schema.sql.gz" "$SQL_DIR/images.sql.gz" "$SQL_DIR/data.sql.gz"
  log "schema+images+data loaded"
}

if [ -n "$GOLDEN" ]; then
  mkdir -p "$(dirname "$GOLDEN")"
  exec 9>"$GOLDEN.lock"
  flock 9
  # stamp: rebuild the cache if the SQL files or the PostgreSQL version change
  STAMP="$(cat "$SQL_DIR/schema.sql.gz" "$SQL_DIR/images.sql.gz" "$SQL_DIR/data.sql.gz" | md5sum | cut -d' ' -f1) $("$PGBIN/postgres" --version)"
  if [ "$(cat "$GOLDEN/.zbx_complete" 2>/dev/null)" != "$STAMP" ]; then
    log "building golden cluster $GOLDEN"
    # Built inside the workdir, which the PostgreSQL user can reach (the
    # cache may be under a home directory it cannot), then copied.
    tmp=$W/golden
    build_cluster "$tmp"
    as_pg "$PGBIN/pg_ctl" -D "$tmp" -m fast -w stop >/dev/null   # clean shutdown => copyable
    as_pg "$PGBIN/pg_resetwal" -f -D "$tmp" >/dev/null   # drop ~80 MB of recycled WAL (safe after clean stop)
    rm -rf "$GOLDEN" "$GOLDEN.tmp"; cp -a "$tmp" "$GOLDEN.tmp"; mv "$GOLDEN.tmp" "$GOLDEN"; rm -rf "$tmp"
    echo "$STAMP" > "$GOLDEN/.zbx_complete"
  fi
  flock -u 9; exec 9>&-
  cp -a "$GOLDEN" "$W/pg"
  rm -f "$W/pg/.zbx_complete"
  log "copied golden cluster"
  pg_start "$W/pg"
  log "postgres up"
else
  build_cluster "$W/pg"
fi
PG_PID=$(head -n1 "$W/pg/postmaster.pid")

# --- frontend config, private to this instance ---
cat > "$W/zabbix.conf.php" <<EOF
<?php
\$DB['TYPE']          = 'POSTGRESQL';
\$DB['SERVER']        = '127.0.0.1';
\$DB['PORT']          = '$PG_PORT';
\$DB['DATABASE']      = 'zabbix';
\$DB['USER']          = 'zabbix';
\$DB['PASSWORD']      = '';
\$DB['SCHEMA']        = '';
\$DB['ENCRYPTION']    = false;
\$DB['KEY_FILE']      = '';
\$DB['CERT_FILE']     = '';
\$DB['CA_FILE']       = '';
\$DB['VERIFY_HOST']   = false;
\$DB['CIPHER_LIST']   = '';
\$DB['VAULT_URL']     = '';
\$DB['VAULT_DB_PATH'] = '';
\$DB['VAULT_TOKEN']   = '';
\$DB['DOUBLE_IEEE754'] = true;
\$ZBX_SERVER_NAME     = 'zbx-test-$HTTP_PORT';
\$IMAGE_FORMAT_DEFAULT = IMAGE_FORMAT_PNG;
EOF
sed "s#'/etc/zabbix/zabbix.conf.php'#'$W/zabbix.conf.php'#" \
    "$UI_DIR/include/classes/core/CConfigFile.php" > "$W/CConfigFile.php"
grep -q "'$W/zabbix.conf.php'" "$W/CConfigFile.php" || { echo "CConfigFile patch failed" >&2; exit 1; }
# Prepend file: defines the patched class and tags every response with this instance's id, so the
# readiness probe cannot be fooled by some other server already listening on <http_port>.
INSTANCE_ID="$HTTP_PORT-$$-$RANDOM"
printf '<?php\nrequire %s;\nheader(%s);\n' "'$W/CConfigFile.php'" "'X-Zbx-Instance: $INSTANCE_ID'" > "$W/prepend.php"

# setsid: own process group, so stop.sh can kill the server and its worker children together.
PHP_CLI_SERVER_WORKERS=$WORKERS setsid php \
  -d auto_prepend_file="$W/prepend.php" -d opcache.enable_cli=1 -d memory_limit=512M \
  -d display_errors=stderr -S "127.0.0.1:$HTTP_PORT" -t "$UI_DIR" \
  </dev/null >"$W/php.log" 2>&1 &
PHP_PID=$!

URL="http://127.0.0.1:$HTTP_PORT/api_jsonrpc.php"
for i in $(seq 1 300); do
  resp=$(curl -fsS -i -m 2 -H 'Content-Type: application/json-rpc' \
       -d '{"jsonrpc":"2.0","method":"apiinfo.version","params":{},"id":1}' "$URL" 2>/dev/null || true)
  if grep -q "X-Zbx-Instance: $INSTANCE_ID" <<<"$resp" && grep -q '"result":"6\.0' <<<"$resp"; then
    break
  fi
  if ! kill -0 "$PHP_PID" 2>/dev/null; then echo "php -S died:" >&2; cat "$W/php.log" >&2; exit 1; fi
  [ "$i" = 300 ] && { echo "API did not answer in time" >&2; exit 1; }
  sleep 0.05
done
log "API answers apiinfo.version"

cat > "$W/stop.sh" <<EOF
#!/usr/bin/env bash
# stop this instance; --rm also deletes $W
kill -TERM -- -$PHP_PID 2>/dev/null || true
$( [ "$(id -u)" = 0 ] && echo "runuser -u ${PG_OS_USER:-postgres} -- " )"$PGBIN/pg_ctl" -D "$W/pg" -m immediate -w stop >/dev/null 2>&1 || kill -QUIT $PG_PID 2>/dev/null || true
[ "\${1:-}" = --rm ] && rm -rf "$W"
exit 0
EOF
chmod +x "$W/stop.sh"

cat <<EOF | tee "$W/instance.env"
ZBX_URL=$URL
ZBX_HTTP_PORT=$HTTP_PORT
ZBX_PG_PORT=$PG_PORT
ZBX_PHP_PID=$PHP_PID
ZBX_PG_PID=$PG_PID
ZBX_WORKDIR=$W
ZBX_STOP=$W/stop.sh
ZBX_START_MS=$(ms)
EOF
