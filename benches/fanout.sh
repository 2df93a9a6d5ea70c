#!/usr/bin/env bash
# Vibe WebSocket fan-out benchmarks: one scenario of benches/fanout.rs against Vibe and, for
# broadcast and idle, against the bare transport peer (benches/peers/bare.rs) in the same run.
#
#   SCENARIO=broadcast CONNECTIONS=1000 RATE=100 DURATION=10 benches/fanout.sh
#   SCENARIO=idle CONNECTIONS=10000 DURATION=5 SOURCE_ADDRS=4 benches/fanout.sh
#   SCENARIO=distinct CONNECTIONS=500 RATE=100 benches/fanout.sh
#   SCENARIO=churn CONNECTIONS=1000 CHURN_RATE=100 RATE=20 benches/fanout.sh
#   SMOKE=1 benches/fanout.sh   # every scenario with tiny numbers; non-zero exit on missing
#                               # events or errors (for CI)
#
# Scenarios (details in benches/fanout.rs):
#   broadcast  CONNECTIONS subscribers of one global live query, one writer at RATE/s
#   idle       CONNECTIONS connections held DURATION s (subscribed unless NO_SUBSCRIBE=1): RSS
#              per connection
#   distinct   subscriber i reads `where data.k = i`: CONNECTIONS distinct live queries
#   churn      CHURN_RATE connections per second close and resume with `since`
#
# Needs: cargo, psql, curl, jq, python3, and a PostgreSQL 13+ at 127.0.0.1:5432 that lets user
# `postgres` in without a password (trust). Creates a throwaway database vibe_bench_<random>,
# starts a release `vibe serve` on it (and `bare_peer`) at free 127.0.0.1 ports; everything is
# removed on exit. Server CPU is the server process only (Vibe's PostgreSQL work is not in it).
#
# Env knobs: SCENARIO (default broadcast), CONNECTIONS (1000), RATE (writes/s, 100; churn 20),
# DURATION (measured seconds, 10), WARMUP (2), DRAIN (5), SOURCE_ADDRS (1..254, 1),
# CHURN_RATE (connections per second, default CONNECTIONS/10), NO_SUBSCRIBE (idle, 0),
# SMOKE (0), CARGO_TARGET_DIR (default ./target).

set -euo pipefail
shopt -s inherit_errexit

SMOKE="${SMOKE:-0}"
SCENARIO="${SCENARIO:-broadcast}"
CONNECTIONS="${CONNECTIONS:-1000}"
RATE="${RATE:-}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
DRAIN="${DRAIN:-5}"
SOURCE_ADDRS="${SOURCE_ADDRS:-1}"
CHURN_RATE="${CHURN_RATE:-}"
NO_SUBSCRIBE="${NO_SUBSCRIBE:-0}"
SUBJECT=did:key:zBench
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres

if [[ "$SMOKE" == 1 ]]; then
    SCENARIOS=(broadcast idle distinct churn)
    CONNECTIONS=20 RATE=20 DURATION=2 WARMUP=1 DRAIN=3 CHURN_RATE=5 SOURCE_ADDRS=2 NO_SUBSCRIBE=0
else
    case "$SCENARIO" in
        broadcast|idle|distinct|churn) SCENARIOS=("$SCENARIO") ;;
        *) echo "error: SCENARIO must be broadcast, idle, distinct or churn (got '$SCENARIO')" >&2; exit 2 ;;
    esac
fi
CHURN_RATE="${CHURN_RATE:-$(( CONNECTIONS / 10 > 0 ? CONNECTIONS / 10 : 1 ))}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
COMMAND="SMOKE=$SMOKE SCENARIO=$SCENARIO CONNECTIONS=$CONNECTIONS RATE=${RATE:-default} DURATION=$DURATION WARMUP=$WARMUP SOURCE_ADDRS=$SOURCE_ADDRS benches/fanout.sh"

for tool in cargo psql curl jq python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres "$@"; }

# --- build -------------------------------------------------------------------------------------

echo "==> building release binaries (cargo build --release --bins --benches)" >&2
BUILD_LOG="$(cargo build --release --bins --benches --message-format=json-render-diagnostics)"
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)"
VIBE_BIN="$TARGET_DIR/release/vibe"
bench_bin() {
    jq -r --arg name "$1" 'select(.reason == "compiler-artifact" and .target.name == $name
                               and (.target.kind | index("bench"))) | .executable // empty' <<<"$BUILD_LOG" | tail -n 1
}
FANOUT_BIN="$(bench_bin fanout)"
BARE_BIN="$(bench_bin bare_peer)"
[[ -x "$VIBE_BIN" ]] || { echo "error: $VIBE_BIN was not built" >&2; exit 1; }
[[ -n "$FANOUT_BIN" && -x "$FANOUT_BIN" ]] || { echo "error: the fanout bench binary was not built" >&2; exit 1; }
[[ -n "$BARE_BIN" && -x "$BARE_BIN" ]] || { echo "error: the bare_peer bench binary was not built" >&2; exit 1; }

# --- database, servers, token ------------------------------------------------------------------

DB="vibe_bench_$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')"
WORK="$(mktemp -d -t vibe-fanout.XXXXXX)"
DATA_DIR="$(mktemp -d -t vibe-fanout-data.XXXXXX)"
SERVER_PID=""
BARE_PID=""
DB_CREATED=""

stop_pid() {
    local pid=$1
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid" 2>/dev/null || true
    fi
}

cleanup() {
    local status=$?
    set +e
    stop_pid "$SERVER_PID"
    stop_pid "$BARE_PID"
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
VIBE_URL="http://127.0.0.1:$PORT"
export VIBE_DATABASE_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB"
export VIBE_LISTEN="127.0.0.1:$PORT"
export VIBE_DATA_DIR="$DATA_DIR"
export VIBE_LOG__LEVEL=warn
unset RUST_LOG DATABASE_URL

# Servers and client hold one socket per connection: give everyone the hard open-files limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

wait_health() {
    local url=$1 pid=$2 log=$3
    for _ in $(seq 1 300); do
        curl -fsS "$url/health" >/dev/null 2>&1 && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: the server at $url exited; its log:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "error: $url/health never answered" >&2
    cat "$log" >&2
    exit 1
}

echo "==> starting vibe serve on $VIBE_URL (database $DB)" >&2
"$VIBE_BIN" serve >"$WORK/vibe.log" 2>&1 &
SERVER_PID=$!
wait_health "$VIBE_URL" "$SERVER_PID" "$WORK/vibe.log"

# The server's log goes to stdout too; the token is the command's last line.
TOKEN="$("$VIBE_BIN" token mint --sub "$SUBJECT" --scope '*' --ttl 24h | tail -n 1)"
[[ -n "$TOKEN" ]] || { echo "error: token mint printed nothing" >&2; exit 1; }
export VIBE_BENCH_TOKEN="$TOKEN"

BARE_URL=""
needs_bare=0
for s in "${SCENARIOS[@]}"; do [[ "$s" == broadcast || "$s" == idle ]] && needs_bare=1; done
if (( needs_bare )); then
    "$BARE_BIN" --listen 127.0.0.1:0 >"$WORK/bare.log" 2>&1 &
    BARE_PID=$!
    for _ in $(seq 1 100); do
        BARE_URL="$(sed -nE 's/^listening on (http:\/\/[0-9.:]+)$/\1/p' "$WORK/bare.log" | head -n 1)"
        [[ -n "$BARE_URL" ]] && break
        kill -0 "$BARE_PID" 2>/dev/null || { cat "$WORK/bare.log" >&2; echo "error: bare_peer exited" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n "$BARE_URL" ]] || { echo "error: bare_peer never printed its address" >&2; exit 1; }
    wait_health "$BARE_URL" "$BARE_PID" "$WORK/bare.log"
    echo "==> bare_peer on $BARE_URL" >&2
fi

# --- runs --------------------------------------------------------------------------------------

FAILED=()

# run SCENARIO SERVER URL PID -> writes $WORK/<scenario>-<server>.json
run() {
    local scenario=$1 server=$2 url=$3 pid=$4 rate json
    json="$WORK/$scenario-$server.json"
    local args=(--url "$url" --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP"
                --drain "$DRAIN" --source-addrs "$SOURCE_ADDRS" --server-pid "$pid" --json "$json")
    case "$scenario" in
        broadcast|distinct) args+=(--rate "${RATE:-100}") ;;
        churn) args+=(--rate "${RATE:-20}" --churn-rate "$CHURN_RATE") ;;
        idle) [[ "$NO_SUBSCRIBE" == 1 ]] && args+=(--no-subscribe) ;;
    esac
    echo "==> $scenario against $server: fanout $scenario ${args[*]}" >&2
    "$FANOUT_BIN" "$scenario" "${args[@]}" | sed 's/^/    /' >&2
    local errors missing
    errors="$(jq -r '.errors' "$json")"
    missing="$(jq -r '.events_missing' "$json")"
    if (( errors > 0 || missing > 0 )); then
        FAILED+=("$scenario against $server: $errors errors, $missing missing events; first error: $(jq -r '.first_error // "none"' "$json")")
    fi
}

for s in "${SCENARIOS[@]}"; do
    run "$s" vibe "$VIBE_URL" "$SERVER_PID"
    if [[ "$s" == broadcast || "$s" == idle ]]; then
        run "$s" bare "$BARE_URL" "$BARE_PID"
    fi
done
if grep -qiE 'error|panic' "$WORK/vibe.log"; then
    echo "    vibe server log (warnings and errors):" >&2
    sed 's/^/    | /' "$WORK/vibe.log" | tail -n 20 >&2
fi

# --- report ------------------------------------------------------------------------------------

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else printf "n/a" }'; }
f0() { awk -v x="$1" 'BEGIN { if (x == "null" || x == "") print "n/a"; else printf "%.0f", x }'; }
f1() { awk -v x="$1" 'BEGIN { if (x == "null" || x == "") print "n/a"; else printf "%.1f", x }'; }
f2() { awk -v x="$1" 'BEGIN { if (x == "null" || x == "") print "n/a"; else printf "%.2f", x }'; }
j() { jq -r "$2" "$WORK/$1.json"; }
mib() { awk -v x="$1" 'BEGIN { if (x == "null" || x == "") print "n/a"; else printf "%.1f", x / 1024 }'; }

CPU_MODEL="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
cat <<EOF

## Vibe WebSocket fan-out benchmarks

- machine: $(nproc) CPUs, ${CPU_MODEL:-unknown CPU}; PostgreSQL $(psql_admin -At -c 'SHOW server_version') at $PG_HOST:$PG_PORT
- Vibe: $("$VIBE_BIN" --version), release build; load client (benches/fanout.rs), servers and PostgreSQL share this machine
- command: \`$COMMAND\`
- bare = benches/peers/bare.rs (hyper + fastwebsockets, no database: the transport's ceiling);
  server CPU is the server process only (% of one core, over the writing window; Vibe's
  PostgreSQL backends are not included)
EOF

load_row() { # file label
    local f=$1 label=$2
    echo "| $label | $(j "$f" .connections) | $(j "$f" .live_queries) | $(j "$f" .rate) | $(j "$f" .writes_ok) | $(j "$f" .events_expected) | $(j "$f" .events_received) | $(j "$f" .events_missing) | $(f0 "$(j "$f" .events_per_sec)") | $(f2 "$(j "$f" .latency_ms.p50)") | $(f2 "$(j "$f" .latency_ms.p90)") | $(f2 "$(j "$f" .latency_ms.p99)") | $(f2 "$(j "$f" .latency_ms.p99_9)") | $(f2 "$(j "$f" .latency_ms.max)") | $(j "$f" .errors) | $(f0 "$(j "$f" .cpu.server_cpu_percent)")% | $(mib "$(j "$f" .cpu.server_rss_kib)") | $(f0 "$(j "$f" .cpu.client_cpu_percent)")% |"
}
load_header() {
    echo
    echo "| server | connections | live queries | writes/s | writes | events expected | received | missing | events/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | server CPU | server RSS MiB | client CPU |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
}
# ratio_of FIELD -> Vibe / bare of one field of the broadcast runs
ratio_of() { ratio "$(j "$1-vibe" "$2")" "$(j "$1-bare" "$2")"; }

for s in "${SCENARIOS[@]}"; do
    case "$s" in
        broadcast)
            echo
            echo "### broadcast: $CONNECTIONS subscribers of one live query"
            load_header
            load_row broadcast-vibe Vibe
            load_row broadcast-bare bare
            echo "| Vibe / bare | | | | | | | | $(ratio_of broadcast .events_per_sec) | $(ratio_of broadcast .latency_ms.p50) | $(ratio_of broadcast .latency_ms.p90) | $(ratio_of broadcast .latency_ms.p99) | $(ratio_of broadcast .latency_ms.p99_9) | $(ratio_of broadcast .latency_ms.max) | | $(ratio_of broadcast .cpu.server_cpu_percent) | $(ratio_of broadcast .cpu.server_rss_kib) | $(ratio_of broadcast .cpu.client_cpu_percent) |"
            ;;
        distinct)
            echo
            echo "### distinct: $CONNECTIONS subscribers, one live query each (\`where data.k = i\`)"
            load_header
            load_row distinct-vibe Vibe
            echo
            echo "misrouted events (reached a subscriber whose query does not match): $(j distinct-vibe .misrouted)"
            ;;
        idle)
            echo
            echo "### idle: $CONNECTIONS connections held ${DURATION}s ($([[ "$NO_SUBSCRIBE" == 1 ]] && echo "not subscribed" || echo "each subscribed to one shared live query"))"
            echo
            echo "| server | connections | opened | connect s | connects/s | connect errors | dropped | server RSS before MiB | server RSS with all open MiB | server bytes / connection | client bytes / connection |"
            echo "|---|---|---|---|---|---|---|---|---|---|---|"
            for srv in vibe bare; do
                f="idle-$srv"
                echo "| $([[ $srv == vibe ]] && echo Vibe || echo bare) | $(j "$f" .connections) | $(j "$f" .opened) | $(f2 "$(j "$f" .connect_secs)") | $(f0 "$(j "$f" .connects_per_sec)") | $(j "$f" .connect_errors) | $(j "$f" .disconnected) | $(mib "$(j "$f" .server_rss_before_kib)") | $(mib "$(j "$f" .server_rss_after_kib)") | $(f0 "$(j "$f" .server_bytes_per_connection)") | $(f0 "$(j "$f" .client_bytes_per_connection)") |"
            done
            echo "| Vibe / bare | | | $(ratio_of idle .connect_secs) | $(ratio_of idle .connects_per_sec) | | | | | $(ratio_of idle .server_bytes_per_connection) | |"
            ;;
        churn)
            f=churn-vibe
            echo
            echo "### churn: $CONNECTIONS subscribers, $(j $f .churn_rate) closing and resuming with \`since\` every second"
            echo
            echo "| server | connections | churn/s | writes/s | writes | reconnects | connects/s | resumed:true | resumed:false | reconnect p50 ms | reconnect p99 ms | missing (connections) | duplicated (connections) | errors | server CPU |"
            echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            echo "| Vibe | $(j $f .connections) | $(j $f .churn_rate) | $(j $f .rate) | $(j $f .writes_ok) | $(j $f .reconnects) | $(f1 "$(j $f .connects_per_sec)") | $(j $f .resumed_true) | $(j $f .resumed_false) | $(f2 "$(j $f .reconnect_ms.p50)") | $(f2 "$(j $f .reconnect_ms.p99)") | $(j $f .events_missing) ($(j $f .connections_missing)) | $(j $f .duplicates) ($(j $f .connections_duplicated)) | $(j $f .errors) | $(f0 "$(j $f .cpu.server_cpu_percent)")% |"
            ;;
    esac
done

if (( ${#FAILED[@]} > 0 )); then
    echo
    printf -- '- FAILED: %s\n' "${FAILED[@]}"
    if [[ "$SMOKE" == 1 ]]; then
        exit 1
    fi
fi
