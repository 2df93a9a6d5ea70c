# Shell functions shared by the bench runners (rest_vs_pgbench.sh, realtime.sh, fanout.sh): tool
# checks, the release build, a throwaway database with its cleanup trap, `vibe serve` on a free
# loopback port, a token, and the machine line of the reports.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Sourcing it only defines functions. They expect the caller's `set -euo pipefail` and
# `shopt -s inherit_errexit`, and the variables PG_HOST, PG_PORT, PG_USER (the PostgreSQL to use)
# and SUBJECT (the token's subject). What they set is said above each one.

# require_tools TOOL...: exits 1 naming the first TOOL that is not installed.
require_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
    done
}

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres "$@"; }
psql_bench() { psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$DB" "$@"; }

# --- build -------------------------------------------------------------------------------------

# build_release: `cargo build --release --bins --benches` in the current folder. Sets BUILD_LOG
# (cargo's JSON messages, for bench_bin), TARGET_DIR (cargo's target directory: CARGO_TARGET_DIR,
# default ./target) and VIBE_BIN (the release `vibe`); exits 1 when that was not built.
build_release() {
    echo "==> building release binaries (cargo build --release --bins --benches)" >&2
    BUILD_LOG="$(cargo build --release --bins --benches --message-format=json-render-diagnostics)"
    TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)"
    VIBE_BIN="$TARGET_DIR/release/vibe"
    [[ -x "$VIBE_BIN" ]] || { echo "error: $VIBE_BIN was not built" >&2; exit 1; }
}

# bench_bin NAME: prints the executable of the bench target NAME that build_release built (nothing
# when there is none).
bench_bin() {
    jq -r --arg name "$1" 'select(.reason == "compiler-artifact" and .target.name == $name
                               and (.target.kind | index("bench"))) | .executable // empty' <<<"$BUILD_LOG" | tail -n 1
}

# require_bench_bin NAME: bench_bin, but exits 1 when that executable was not built.
require_bench_bin() {
    local bin
    bin="$(bench_bin "$1")"
    [[ -n "$bin" && -x "$bin" ]] || { echo "error: the $1 bench binary was not built" >&2; exit 1; }
    echo "$bin"
}

# --- database, servers, token ------------------------------------------------------------------

# create_bench_db TMP_PREFIX [PID_VAR...]: creates the throwaway database DB (vibe_bench_<random>)
# and the temporary folders WORK (TMP_PREFIX.XXXXXX) and DATA_DIR (TMP_PREFIX-data.XXXXXX), and sets
# SERVER_PID="". From then on any exit (INT: 130, TERM: 143) runs bench_cleanup: it stops the
# processes whose ids SERVER_PID and the variables named PID_VAR... hold at that time, drops DB
# and removes both folders, keeping the exit status.
create_bench_db() {
    local prefix=$1
    shift
    DB="vibe_bench_$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')"
    WORK="$(mktemp -d -t "$prefix.XXXXXX")"
    DATA_DIR="$(mktemp -d -t "$prefix-data.XXXXXX")"
    SERVER_PID=""
    DB_CREATED=""
    # shellcheck disable=SC2064 # the variable names are fixed now, their values read on exit
    trap "bench_cleanup SERVER_PID $*" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    psql_admin -c "CREATE DATABASE \"$DB\"" >/dev/null
    DB_CREATED=1
}

# bench_cleanup PID_VAR...: the EXIT trap create_bench_db installs.
bench_cleanup() {
    local status=$? var
    set +e
    for var in "$@"; do
        stop_pid "${!var:-}"
    done
    if [[ -n "${DB_CREATED:-}" ]]; then
        psql_admin -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null
    fi
    rm -rf "$WORK" "$DATA_DIR"
    exit "$status"
}

# stop_pid PID: sends SIGTERM to PID (when it is set and running) and waits for it.
stop_pid() {
    local pid=$1
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid" 2>/dev/null || true
    fi
}

# wait_health URL PID LOG [WHAT]: waits (up to about 30 s) until URL/health answers; exits 1,
# showing LOG, when process PID ends first ("error: WHAT exited", WHAT by default "the server at
# URL") or when it never answers.
wait_health() {
    local url=$1 pid=$2 log=$3 what=${4:-the server at $1}
    for _ in $(seq 1 300); do
        curl -fsS "$url/health" >/dev/null 2>&1 && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: $what exited; its log:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    curl -fsS "$url/health" >/dev/null && return 0
    echo "error: $url/health never answered" >&2
    cat "$log" >&2
    exit 1
}

# start_vibe LOG [WHAT]: starts `vibe serve` (VIBE_BIN) on DB at a free 127.0.0.1 port with its
# data in DATA_DIR and its output in $WORK/LOG, and waits for its /health (WHAT: see wait_health).
# Sets PORT, URL (http://127.0.0.1:PORT) and SERVER_PID, and exports the VIBE_* settings it uses
# (VIBE_DATABASE_URL among them); RUST_LOG and DATABASE_URL are unset.
start_vibe() {
    local log="$WORK/$1"
    PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    URL="http://127.0.0.1:$PORT"
    export VIBE_DATABASE_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB"
    export VIBE_LISTEN="127.0.0.1:$PORT"
    export VIBE_DATA_DIR="$DATA_DIR"
    export VIBE_LOG__LEVEL=warn
    unset RUST_LOG DATABASE_URL
    echo "==> starting vibe serve on $URL (database $DB)" >&2
    "$VIBE_BIN" serve >"$log" 2>&1 &
    SERVER_PID=$!
    wait_health "$URL" "$SERVER_PID" "$log" "${2:-}"
}

# stop_vibe: stops the server start_vibe started (if it still runs) and clears SERVER_PID.
stop_vibe() {
    stop_pid "$SERVER_PID"
    SERVER_PID=""
}

# mint_token: sets TOKEN to a token for SUBJECT with scope * valid 24 h (`vibe token mint`).
mint_token() {
    # The server's log goes to stdout too; the token is the command's last line.
    TOKEN="$("$VIBE_BIN" token mint --sub "$SUBJECT" --scope '*' --ttl 24h | tail -n 1)"
    [[ -n "$TOKEN" ]] || { echo "error: token mint printed nothing" >&2; exit 1; }
}

# --- pgbench -----------------------------------------------------------------------------------

# insert_sql TYPE: prints the single-row INSERT of a document of type TYPE owned by SUBJECT, the
# create statement the pgbench runs use.
#
# pgbench reads `:name` anywhere in a statement as a variable (`-M prepared` turns it into a
# parameter), so no colon may be followed by a name character: the owner DID spells its colons
# as E'\x3a' escapes and the JSON has a space after each colon. Both are the same constants.
# (`::` casts are fine: pgbench skips a run of colons not followed by a name character.)
insert_sql() {
    local pg_subject
    pg_subject="$(sed 's/:/\\x3a/g' <<<"$SUBJECT")"
    echo "INSERT INTO documents (id, owner_did, type, acl, data) VALUES (gen_random_uuid(), E'$pg_subject', '$1', '{}', '{\"title\": \"bench\", \"n\": 1}');"
}

# pgbench_summary OUTPUT: shows the latency, tps and failed-transactions lines of pgbench's OUTPUT
# on stderr (indented), and sets PGBENCH_TPS (tps without initial connection time; empty when
# missing) and PGBENCH_FAILED (failed transactions; empty when missing).
pgbench_summary() {
    grep -E '^(latency average|tps|number of failed)' <<<"$1" | sed 's/^/    /' >&2
    PGBENCH_TPS="$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' <<<"$1")"
    PGBENCH_FAILED="$(sed -nE 's/^number of failed transactions: ([0-9]+).*/\1/p' <<<"$1")"
}

# --- report ------------------------------------------------------------------------------------

# machine_line: prints "- machine: N CPUs, <CPU model>; PostgreSQL <version> at HOST:PORT".
machine_line() {
    local cpu_model pg_version
    cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
    pg_version="$(psql_admin -At -c 'SHOW server_version')"
    echo "- machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}; PostgreSQL $pg_version at $PG_HOST:$PG_PORT"
}
