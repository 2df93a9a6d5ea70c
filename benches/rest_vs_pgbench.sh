#!/usr/bin/env bash
# Vibe REST API vs pgbench doing the same single-row work, same concurrency, same run.
#
#   benches/rest_vs_pgbench.sh                       # DURATION=10 CONCURRENCY="8"
#   DURATION=30 CONCURRENCY="1 8 32" benches/rest_vs_pgbench.sh
#
# Needs: cargo, psql, pgbench, curl, jq, python3, and a PostgreSQL 13+ at 127.0.0.1:5432 that
# lets user `postgres` in without a password (trust). Creates a throwaway database
# vibe_bench_<random>, starts a release `vibe serve` on it at a free 127.0.0.1 port, and for each
# concurrency C runs:
#   create: Vibe POST /v1/docs/benchdocs          vs pgbench INSERT INTO documents ... (1 row)
#   read:   Vibe GET  /v1/docs/benchdocs/{id}     vs pgbench SELECT ... WHERE id = ... (1 row)
# The read runs share READ_ROWS documents that the first REST read run creates with
# deterministic ids: document n is 00000000-0000-4000-8000-<n as 12 zero-padded digits>.
# pgbench runs in both -M simple and -M prepared (Vibe's sqlx uses prepared statements).
# Everything is loopback-only; the database, server and data dir are removed on exit.
#
# Env knobs: DURATION (seconds per run, default 10), WARMUP (seconds of unmeasured load before
# each REST run, default 2), CONCURRENCY (space-separated list, default "8"),
# CARGO_TARGET_DIR (where the release build goes, default ./target).

set -euo pipefail
shopt -s inherit_errexit

DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
CONCURRENCY="${CONCURRENCY:-8}"
DOC_TYPE=benchdocs
SUBJECT=did:key:zBench
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres
READ_ROWS=1000

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

for tool in cargo psql pgbench curl jq python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres "$@"; }
psql_bench() { psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$DB" "$@"; }

# --- build -------------------------------------------------------------------------------------

echo "==> building release binaries (cargo build --release --bins --benches)" >&2
BUILD_LOG="$(cargo build --release --bins --benches --message-format=json-render-diagnostics)"
VIBE_BIN="$TARGET_DIR/release/vibe"
LOAD_BIN="$(jq -r 'select(.reason == "compiler-artifact" and .target.name == "http_load"
                          and (.target.kind | index("bench"))) | .executable // empty' <<<"$BUILD_LOG" | tail -n 1)"
[[ -x "$VIBE_BIN" ]] || { echo "error: $VIBE_BIN was not built" >&2; exit 1; }
[[ -n "$LOAD_BIN" && -x "$LOAD_BIN" ]] || { echo "error: the http_load bench binary was not built" >&2; exit 1; }

# --- database, server, token -------------------------------------------------------------------

DB="vibe_bench_$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')"
WORK="$(mktemp -d -t vibe-bench.XXXXXX)"
DATA_DIR="$(mktemp -d -t vibe-bench-data.XXXXXX)"
SERVER_PID=""
DB_CREATED=""

cleanup() {
    local status=$?
    set +e
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null
    fi
    if [[ -n "$DB_CREATED" ]]; then
        psql_admin -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null
    fi
    rm -rf "$WORK" "$DATA_DIR"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

psql_admin -c "CREATE DATABASE \"$DB\"" >/dev/null
DB_CREATED=1

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"
export VIBE_DATABASE_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB"
export VIBE_LISTEN="127.0.0.1:$PORT"
export VIBE_DATA_DIR="$DATA_DIR"
export VIBE_LOG__LEVEL=warn
unset RUST_LOG DATABASE_URL

echo "==> starting vibe serve on $URL (database $DB)" >&2
"$VIBE_BIN" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 300); do
    if curl -fsS "$URL/health" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "error: vibe serve exited; its log:" >&2
        cat "$WORK/server.log" >&2
        exit 1
    fi
    sleep 0.1
done
curl -fsS "$URL/health" >/dev/null || { echo "error: $URL/health never answered" >&2; cat "$WORK/server.log" >&2; exit 1; }

# The server's log goes to stdout too; the token is the command's last line.
TOKEN="$("$VIBE_BIN" token mint --sub "$SUBJECT" --scope '*' --ttl 24h | tail -n 1)"
[[ -n "$TOKEN" ]] || { echo "error: token mint printed nothing" >&2; exit 1; }

# --- pgbench scripts ---------------------------------------------------------------------------

# pgbench reads `:name` anywhere in a statement as a variable (`-M prepared` turns it into a
# parameter), so no colon may be followed by a name character: the owner DID spells its colons
# as E'\x3a' escapes and the JSON has a space after each colon. Both are the same constants.
# (`::` casts are fine: pgbench skips a run of colons not followed by a name character.)
PG_SUBJECT="$(sed 's/:/\\x3a/g' <<<"$SUBJECT")"
cat >"$WORK/create.sql" <<SQL
INSERT INTO documents (id, owner_did, type, acl, data) VALUES (gen_random_uuid(), E'$PG_SUBJECT', '$DOC_TYPE', '{}', '{"title": "bench", "n": 1}');
SQL

# pgbench variables cannot hold a uuid, so the script draws a document number n and builds its id
# the way http_load does (read_id_sql): one primary-key lookup per transaction, like Vibe's GET.
# The column list and the type filter are the ones Vibe's GET uses.
READ_ID_PREFIX=00000000-0000-4000-8000-
read_id_sql() { echo "('$READ_ID_PREFIX' || lpad($1::text, 12, '0'))::uuid"; }
cat >"$WORK/read.sql" <<SQL
\set n random(1, $READ_ROWS)
SELECT id, owner_did, type, created_at, updated_at, rev, acl, data FROM documents WHERE id = $(read_id_sql :n) AND type = '$DOC_TYPE';
SQL

# --- runs --------------------------------------------------------------------------------------

# rest MODE C -> prints "rps p50_us p99_us errors"
rest() {
    local mode=$1 c=$2 out="$WORK/rest_${1}_${2}.json"
    echo "==> Vibe REST $mode, concurrency $c, ${WARMUP}s warmup + ${DURATION}s" >&2
    "$LOAD_BIN" --url "$URL" --token "$TOKEN" --mode "$mode" --type "$DOC_TYPE" \
        --concurrency "$c" --duration "$DURATION" --warmup "$WARMUP" --read-docs "$READ_ROWS" \
        --json "$out" | sed 's/^/    /' >&2
    jq -r '"\(.requests_per_sec) \(.latency_us.p50) \(.latency_us.p99) \(.errors)"' "$out"
}

# pg SCRIPT C PROTOCOL -> prints "tps failed"
pg() {
    local script=$1 c=$2 protocol=$3 jobs=2 out
    (( c < jobs )) && jobs=$c
    echo "==> pgbench $(basename "$script" .sql), -M $protocol, -c $c -j $jobs -T $DURATION" >&2
    out="$(pgbench -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -n -c "$c" -j "$jobs" -T "$DURATION" \
        -M "$protocol" -f "$script" "$DB" 2>&1)" || { echo "$out" >&2; echo "error: pgbench failed" >&2; exit 1; }
    grep -E '^(latency average|tps|number of failed)' <<<"$out" | sed 's/^/    /' >&2
    local tps failed
    tps="$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' <<<"$out")"
    failed="$(sed -nE 's/^number of failed transactions: ([0-9]+).*/\1/p' <<<"$out")"
    echo "${tps:-0} ${failed:-0}"
}

ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
int() { awk -v x="$1" 'BEGIN { printf "%.0f", x }'; }

ROWS=()
NOTES=()
row() { # op c rest_line simple_line prepared_line
    local op=$1 c=$2 rps p50 p99 errors tps_s fail_s tps_p fail_p
    read -r rps p50 p99 errors <<<"$3"
    read -r tps_s fail_s <<<"$4"
    read -r tps_p fail_p <<<"$5"
    ROWS+=("| $op | $c | $(int "$rps") | $(int "$tps_s") | $(int "$tps_p") | $(ratio "$rps" "$tps_p") | $(ms "$p50") / $(ms "$p99") ms |")
    (( errors > 0 )) && NOTES+=("- $op at concurrency $c: $errors REST requests failed (see the run output above).")
    (( fail_s + fail_p > 0 )) && NOTES+=("- $op at concurrency $c: pgbench reported $fail_s (simple) / $fail_p (prepared) failed transactions.")
    return 0
}

READ_ROWS_READY=""
for c in $CONCURRENCY; do
    rest_create="$(rest create "$c")"
    pg_create_s="$(pg "$WORK/create.sql" "$c" simple)"
    pg_create_p="$(pg "$WORK/create.sql" "$c" prepared)"
    row create "$c" "$rest_create" "$pg_create_s" "$pg_create_p"

    # The REST read run first creates (or, on later runs, finds) documents 1..READ_ROWS, so it
    # must come before the pgbench read runs, which read the same rows.
    rest_read="$(rest read "$c")"
    if [[ -z "$READ_ROWS_READY" ]]; then
        have="$(psql_bench -At -c "SELECT count(*) FROM documents WHERE type = '$DOC_TYPE' AND id IN (
            SELECT $(read_id_sql n) FROM generate_series(1, $READ_ROWS) AS n)")"
        [[ "$have" == "$READ_ROWS" ]] || { echo "error: $have of the $READ_ROWS read documents exist" >&2; exit 1; }
        psql_bench -c 'ANALYZE documents'
        READ_ROWS_READY=1
    fi
    pg_read_s="$(pg "$WORK/read.sql" "$c" simple)"
    pg_read_p="$(pg "$WORK/read.sql" "$c" prepared)"
    row read "$c" "$rest_read" "$pg_read_s" "$pg_read_p"
done

# --- report ------------------------------------------------------------------------------------

CPU_MODEL="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
PG_VERSION="$(psql_admin -At -c 'SHOW server_version')"
DOCS="$(psql_bench -At -c "SELECT count(*) || ' (owners: ' || string_agg(DISTINCT owner_did, ', ') || '; types: ' || string_agg(DISTINCT type, ', ') || ')' FROM documents")"

cat <<EOF

## Vibe REST vs pgbench

- machine: $(nproc) CPUs, ${CPU_MODEL:-unknown CPU}; PostgreSQL $PG_VERSION at $PG_HOST:$PG_PORT
- Vibe: $("$VIBE_BIN" --version), release build; load client, server and PostgreSQL share this machine
- each run: ${DURATION}s measured (REST runs add ${WARMUP}s of unmeasured warmup; pgbench runs have none)
- REST: one keep-alive HTTP/1.1 connection per concurrent client; req/s counts 2xx answers only
- pgbench: \`-n -c C -j min(2,C) -T $DURATION\`, one statement per transaction (autocommit)
- create: REST \`POST /v1/docs/$DOC_TYPE\` vs pgbench \`INSERT INTO documents (id, owner_did, type, acl, data) VALUES (gen_random_uuid(), ...)\`
- read: both pick n uniformly in 1..$READ_ROWS and fetch the document with the deterministic id
  \`$READ_ID_PREFIX\` + n as 12 zero-padded digits (seeded by the first REST read run, not measured):
  REST \`GET /v1/docs/$DOC_TYPE/{id}\` vs pgbench \`SELECT ... FROM documents WHERE id = $(read_id_sql :n) AND type = '$DOC_TYPE'\`
  with \`\\set n random(1, $READ_ROWS)\`; one primary-key lookup per read on both sides
- ratio = Vibe REST req/s / pgbench tps (prepared)
- documents in the table at the end: $DOCS

| operation | C | Vibe REST req/s | pgbench tps (simple) | pgbench tps (prepared) | ratio | REST p50 / p99 |
|---|---|---|---|---|---|---|
EOF
printf '%s\n' "${ROWS[@]}"
if (( ${#NOTES[@]} > 0 )); then
    echo
    printf '%s\n' "${NOTES[@]}"
fi
