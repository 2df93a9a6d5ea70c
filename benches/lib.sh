# Shell functions shared by the bench runners (rest_vs_pgbench.sh, realtime.sh, fanout.sh): tool
# checks, the release build, a throwaway database with its cleanup trap, `vibe serve` on a free
# loopback port, a token, pgbench insert runs (the change feed on and off, a plain table),
# and the machine line of the reports.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Sourcing it only defines functions (and the constants INSERT_LOG_COLUMNS, PLAIN_TABLE and
# PLAIN_TABLE_DDL). They expect the caller's `set -euo pipefail` and
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
# default ./target) and VIBE_BIN (the release `vibe`, or the executable SERVER_BIN names, to measure
# another build: `SERVER_BIN=/tmp/vibe-before`); exits 1 when that was not built.
build_release() {
    echo "==> building release binaries (cargo build --release --bins --benches)" >&2
    BUILD_LOG="$(cargo build --release --bins --benches --message-format=json-render-diagnostics)"
    TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)"
    VIBE_BIN="${SERVER_BIN:-$TARGET_DIR/release/vibe}"
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

# insert_sql TYPE [TABLE]: prints the single-row INSERT of a document of type TYPE owned by
# SUBJECT into TABLE (default documents), the create statement the pgbench runs use.
#
# pgbench reads `:name` anywhere in a statement as a variable (`-M prepared` turns it into a
# parameter), so no colon may be followed by a name character: the owner DID spells its colons
# as E'\x3a' escapes and the JSON has a space after each colon. Both are the same constants.
# (`::` casts are fine: pgbench skips a run of colons not followed by a name character.)
insert_sql() {
    local pg_subject
    pg_subject="$(sed 's/:/\\x3a/g' <<<"$SUBJECT")"
    echo "INSERT INTO ${2:-documents} (id, owner_did, type, acl, data) VALUES (gen_random_uuid(), E'$pg_subject', '$1', '{}', '{\"title\": \"bench\", \"n\": 1}');"
}

# pgbench_summary OUTPUT: shows the latency, tps and failed-transactions lines of pgbench's OUTPUT
# on stderr (indented), and sets PGBENCH_TPS (tps without initial connection time; empty when
# missing), PGBENCH_FAILED (failed transactions; empty when missing) and PGBENCH_TXNS
# (transactions processed; empty when missing).
pgbench_summary() {
    grep -E '^(latency average|tps|number of failed)' <<<"$1" | sed 's/^/    /' >&2
    PGBENCH_TPS="$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' <<<"$1")"
    PGBENCH_FAILED="$(sed -nE 's/^number of failed transactions: ([0-9]+).*/\1/p' <<<"$1")"
    PGBENCH_TXNS="$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' <<<"$1")"
}

# --- insert throughput: the change feed's share of an insert on and off, and a plain table ------

# What the change feed adds to an INSERT (migrations/0013): two column defaults that mark the row
# with its transaction (`log_xid`) and its place in the feed (`log_seq`), and the partial index of
# marked rows. Without the defaults the columns stay NULL and the index is not touched: the feed
# off. (Updates and deletes are logged by a trigger; these runs only insert.)
INSERT_LOG_COLUMNS="'log_xid', 'log_seq'"

# The plain table of the `plain` insert case: the columns of documents without the generated ACL
# summary columns and the feed's marks, a primary key and nothing else (no CHECK, trigger or other
# index).
PLAIN_TABLE=plain_docs
PLAIN_TABLE_DDL="CREATE TABLE IF NOT EXISTS $PLAIN_TABLE (
    id uuid PRIMARY KEY, owner_did text NOT NULL, type text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    rev bigint NOT NULL DEFAULT 1, acl jsonb NOT NULL DEFAULT '{}', data jsonb NOT NULL)"

# insert_log_defaults: prints the feed's column defaults on documents in DB as
# "ALTER COLUMN name SET DEFAULT expr" clauses joined by ", " (what `set_insert_logging on`
# restores); exits 1 unless both are there.
insert_log_defaults() {
    local clauses
    clauses="$(psql_bench -At -c "SELECT string_agg(format('ALTER COLUMN %I SET DEFAULT %s', a.attname, pg_get_expr(d.adbin, d.adrelid)), ', ' ORDER BY a.attname)
        FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
        WHERE d.adrelid = 'documents'::regclass AND a.attname IN ($INSERT_LOG_COLUMNS)
        HAVING count(*) = 2")"
    [[ -n "$clauses" ]] || { echo "error: documents lacks the change feed's column defaults" >&2; exit 1; }
    echo "$clauses"
}

# set_insert_logging on|off: puts back (INSERT_LOG_DEFAULTS, from insert_log_defaults) or drops
# the feed's column defaults on documents in DB, and exits 1 unless pg_attrdef then agrees.
set_insert_logging() {
    local state=$1 defaults
    if [[ "$state" == on ]]; then
        psql_bench -c "ALTER TABLE documents $INSERT_LOG_DEFAULTS"
    else
        psql_bench -c "ALTER TABLE documents ALTER COLUMN log_xid DROP DEFAULT, ALTER COLUMN log_seq DROP DEFAULT"
    fi
    defaults="$(psql_bench -At -c "SELECT count(*) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
        WHERE d.adrelid = 'documents'::regclass AND a.attname IN ($INSERT_LOG_COLUMNS)")"
    [[ ( "$state" == on && "$defaults" == 2 ) || ( "$state" == off && "$defaults" == 0 ) ]] \
        || { echo "error: documents has $defaults of the feed's 2 column defaults, wanted $state" >&2; exit 1; }
}

# insert_rounds ROUNDS TYPE CASE...: single-row insert throughput with pgbench, ROUNDS rounds of
# every CASE in the order given, rotated by one case per round (on off: "on, off", "off, on",
# ...; on off plain: each case goes first once in three rounds). pgbench runs with
# `-n -c INSERT_CLIENTS -j INSERT_JOBS -T INSERT_SECS -M prepared` (the caller sets those three);
# each run's statement is one INSERT (insert_sql TYPE). Cases:
#   on     into documents as shipped (the change feed on: each row marked for the feed)
#   off    into documents without the feed's column defaults (everything else of documents stays)
#   plain  into PLAIN_TABLE (created here if missing): the same row in a bare table
# Before each run the defaults are set (and checked) and the database CHECKPOINTed; after it the
# marked rows must have grown by exactly pgbench's transactions (on) or not at all (off, plain),
# and the change log not at all, else exit 1, as on any pgbench failure. Needs WORK and DB, and
# nothing else writing to DB meanwhile (stop the servers first). Sets INSERT_TPS (associative:
# "CASE ROUND" -> tps), INSERT_ORDER (indexed by round: "on, off"), INSERT_PGBENCH (the pgbench
# options as text) and INSERT_STATEMENT (associative: CASE -> statement); leaves the feed on.
insert_rounds() {
    local rounds=$1 type=$2 round i c count joined
    shift 2
    local cases=("$@") order=()
    declare -gA INSERT_TPS=() INSERT_STATEMENT=()
    declare -ga INSERT_ORDER=()
    INSERT_LOG_DEFAULTS="$(insert_log_defaults)"
    INSERT_PGBENCH="-n -c $INSERT_CLIENTS -j $INSERT_JOBS -T $INSERT_SECS -M prepared"
    for c in "${cases[@]}"; do
        case "$c" in
            on|off) INSERT_STATEMENT[$c]="$(insert_sql "$type")" ;;
            plain)
                psql_bench -c "$PLAIN_TABLE_DDL"
                INSERT_STATEMENT[$c]="$(insert_sql "$type" "$PLAIN_TABLE")"
                ;;
            *) echo "error: unknown insert case '$c' (on, off or plain)" >&2; exit 2 ;;
        esac
        printf '%s\n' "${INSERT_STATEMENT[$c]}" >"$WORK/insert-$c.sql"
    done
    count=${#cases[@]}
    for round in $(seq 1 "$rounds"); do
        order=()
        for i in $(seq 0 $(( count - 1 ))); do
            order+=("${cases[$(( (round - 1 + i) % count ))]}")
        done
        joined="$(printf '%s, ' "${order[@]}")"
        INSERT_ORDER[$round]="${joined%, }"
        for c in "${order[@]}"; do
            insert_run "$c"
            INSERT_TPS["$c $round"]="$PGBENCH_TPS"
        done
    done
    set_insert_logging on
}

# The feed's record of inserts and of everything else, as "marked logged".
feed_counts() {
    psql_bench -At -F ' ' -c "SELECT (SELECT count(*) FROM documents WHERE log_xid IS NOT NULL), (SELECT count(*) FROM changes)"
}

# insert_run CASE: one pgbench run of CASE (see insert_rounds); sets PGBENCH_TPS.
insert_run() {
    local c=$1 out before after marked logged
    case "$c" in
        on|off) set_insert_logging "$c" ;;
    esac
    psql_bench -c 'CHECKPOINT'
    before="$(feed_counts)"
    echo "==> pgbench insert ($c: ${INSERT_STATEMENT[$c]%% (*}), $INSERT_PGBENCH" >&2
    # shellcheck disable=SC2086 # INSERT_PGBENCH is a list of options
    out="$(pgbench -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" $INSERT_PGBENCH -f "$WORK/insert-$c.sql" "$DB" 2>&1)" \
        || { echo "$out" >&2; echo "error: pgbench failed" >&2; exit 1; }
    pgbench_summary "$out"
    (( ${PGBENCH_FAILED:-0} == 0 )) || { echo "error: pgbench reported $PGBENCH_FAILED failed transactions" >&2; exit 1; }
    [[ -n "$PGBENCH_TPS" && -n "$PGBENCH_TXNS" ]] || { echo "$out" >&2; echo "error: no tps or transaction count in pgbench's output" >&2; exit 1; }
    after="$(feed_counts)"
    marked=$(( ${after% *} - ${before% *} )) logged=$(( ${after#* } - ${before#* } ))
    local want=0
    if [[ "$c" == on ]]; then want=$PGBENCH_TXNS; fi
    (( marked == want && logged == 0 )) || {
        echo "error: insert case $c: $marked rows marked for the feed and $logged log rows over $PGBENCH_TXNS inserts (expected $want and 0)" >&2
        exit 1
    }
}

# --- report ------------------------------------------------------------------------------------

# machine_line: prints "- machine: N CPUs, <CPU model>; PostgreSQL <version> at HOST:PORT" and
# "- idle CPUs: ..." (idle_line).
machine_line() {
    local cpu_model pg_version
    cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
    pg_version="$(psql_admin -At -c 'SHOW server_version')"
    echo "- machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}; PostgreSQL $pg_version at $PG_HOST:$PG_PORT"
    echo "- idle CPUs: $(idle_line)"
}

# idle_line: how an idle CPU waits here. In a VM a halted vCPU is expensive to wake, and whether
# the guest polls first (cpuidle-haltpoll's guest_halt_poll_ns) moved Vibe's C = 8 reads by a
# third while pgbench did not move (docs/benchmarks.md, session 14), so every record says which.
idle_line() {
    local dir=/sys/devices/system/cpu/cpuidle driver governor poll
    driver="$(cat "$dir/current_driver" 2>/dev/null || echo unknown)"
    governor="$(cat "$dir/current_governor" 2>/dev/null || cat "$dir/current_governor_ro" 2>/dev/null || echo unknown)"
    poll="$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || true)"
    echo "cpuidle driver $driver, governor $governor${poll:+, guest_halt_poll_ns $poll}"
}
