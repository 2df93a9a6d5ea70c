#!/usr/bin/env bash
# Vibe WebSocket fan-out benchmarks: one scenario of benches/fanout.rs against Vibe and, for
# broadcast and idle, against the bare transport peer (benches/peers/bare.rs) and the Node.js
# LISTEN/NOTIFY peer (benches/peers/node) and PostGraphile with pg-pubsub subscriptions
# (benches/peers/postgraphile; both when node and npm are installed) in the same run; or the
# write overhead of the change feed (pgbench).
#
#   SCENARIO=broadcast CONNECTIONS=1000 RATE=100 DURATION=10 benches/fanout.sh
#   SCENARIO=idle CONNECTIONS=10000 DURATION=5 SOURCE_ADDRS=4 benches/fanout.sh
#   SCENARIO=distinct CONNECTIONS=500 RATE=100 benches/fanout.sh
#   SCENARIO=churn CONNECTIONS=1000 CHURN_RATE=100 RATE=20 benches/fanout.sh
#   SCENARIO=idle CONNECTIONS=19000 PROCESSES=2 SOURCE_ADDRS=4 benches/fanout.sh
#                               # the client split over 2 worker processes (each has its own
#                               # open-files limit; each server still has its own, its ceiling)
#   SCENARIO=write DURATION=20 PG_ROUNDS=3 benches/fanout.sh
#   SMOKE=1 benches/fanout.sh   # every scenario with tiny numbers, plus broadcast and idle
#                               # against Vibe with PROCESSES=2; non-zero exit on missing events
#                               # or errors (for CI)
#   NO_NODE=1 ROUNDS=3 CONNECTIONS=1000 RATE=100 DURATION=10 benches/fanout.sh
#                               # broadcast against Vibe and the bare peer in turn, 3 rounds, and
#                               # the median of each round's Vibe / bare ratio (this VM's noise
#                               # moves a single run's p99 by a third)
#   SCENARIO=broadcast SWEEP="100 500 1000" RATE=50 DURATION=5 benches/fanout.sh
#                               # broadcast once per N for every server, then an SVG chart
#                               # (benches/plot.rs) of p50/p99 latency and events/s vs N
#
# Scenarios (details in benches/fanout.rs):
#   broadcast  CONNECTIONS subscribers of one global live query, one writer at RATE/s
#   idle       CONNECTIONS connections held DURATION s (subscribed unless NO_SUBSCRIBE=1): RSS
#              per connection
#   distinct   subscriber i reads `where data.k = i`: CONNECTIONS distinct live queries
#   churn      CHURN_RATE connections per second close and resume with `since`
#   write      single-row inserts with pgbench (-c PG_CLIENTS -T DURATION, PG_ROUNDS rounds; all
#              servers stopped first): into documents with the change feed on (rows marked for
#              the feed), with it off, and into a plain table with the same columns (primary key
#              only)
#
# Needs: cargo, psql, curl, jq, python3 (write: pgbench), and a PostgreSQL 13+ at 127.0.0.1:5432
# that lets user `postgres` in without a password (trust); node 18+ and npm for the Node and
# PostGraphile peers (skipped, saying why, without them). Creates a throwaway database
# vibe_bench_<random>, starts a release `vibe serve` on it (and `bare_peer`, and each npm peer's
# `node server.js` on the same database after one `npm ci` in its folder) at free 127.0.0.1 ports;
# everything is removed on exit. Server CPU is the server process only (the PostgreSQL work of
# Vibe and of the npm peers is not in it).
#
# Env knobs: SCENARIO (default broadcast), CONNECTIONS (1000), RATE (writes/s, 100; churn 20),
# DURATION (measured seconds, 10; write: per pgbench run), WARMUP (2), DRAIN (5), SOURCE_ADDRS
# (1..254, 1), PROCESSES (client processes holding the connections, 1; not for churn),
# CHURN_RATE (connections per second, default CONNECTIONS/10), NO_SUBSCRIBE (idle, 0), LIMIT
# (the live queries' `limit`, 10: once a window is full, each write also sends every subscriber a
# `remove`, from every server, the peers keeping the same windows; above the run's writes, adds only),
# PG_ROUNDS (write: rounds, 3), PG_CLIENTS (write: pgbench -c, 8),
# SMOKE (0), NO_NODE (1: skip the Node peer), NO_POSTGRAPHILE (1: skip PostGraphile; default:
# NO_NODE's value), SWEEP (space-separated connection counts; broadcast
# only), ROUNDS (broadcast: run every server ROUNDS times, alternating, and report the median of
# the per-round ratios; 1), RESULTS_DIR (where the JSON results, and a sweep's fanout-sweep.svg, are kept; default:
# a temporary folder removed on exit, for a sweep $CARGO_TARGET_DIR/fanout/sweep-<UTC time>),
# SAVE_PLOT (1: also copy a sweep's chart to docs/fanout-sweep.svg), CARGO_TARGET_DIR (./target).

set -euo pipefail
shopt -s inherit_errexit
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SMOKE="${SMOKE:-0}"
SCENARIO="${SCENARIO:-broadcast}"
CONNECTIONS="${CONNECTIONS:-1000}"
RATE="${RATE:-}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
DRAIN="${DRAIN:-5}"
SOURCE_ADDRS="${SOURCE_ADDRS:-1}"
LIMIT="${LIMIT:-10}"
PROCESSES="${PROCESSES:-1}"
PG_ROUNDS="${PG_ROUNDS:-3}"
PG_CLIENTS="${PG_CLIENTS:-8}"
CHURN_RATE="${CHURN_RATE:-}"
NO_SUBSCRIBE="${NO_SUBSCRIBE:-0}"
NO_NODE="${NO_NODE:-0}"
NO_POSTGRAPHILE="${NO_POSTGRAPHILE:-$NO_NODE}"
SWEEP="${SWEEP:-}"
ROUNDS="${ROUNDS:-1}"
SAVE_PLOT="${SAVE_PLOT:-0}"
RESULTS_DIR="${RESULTS_DIR:-}"
SUBJECT=did:key:zBench
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres

if [[ "$SMOKE" == 1 ]]; then
    # write last: it stops the servers.
    SCENARIOS=(broadcast idle distinct churn write)
    CONNECTIONS=20 RATE=20 DURATION=2 WARMUP=1 DRAIN=3 CHURN_RATE=5 SOURCE_ADDRS=2 NO_SUBSCRIBE=0
    PROCESSES=1 PG_ROUNDS=1
else
    case "$SCENARIO" in
        broadcast|idle|distinct|churn|write) SCENARIOS=("$SCENARIO") ;;
        *) echo "error: SCENARIO must be broadcast, idle, distinct, churn or write (got '$SCENARIO')" >&2; exit 2 ;;
    esac
fi
[[ "$PROCESSES" =~ ^[1-9][0-9]*$ ]] || { echo "error: PROCESSES must be a positive number (got '$PROCESSES')" >&2; exit 2; }
[[ "$PG_ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "error: PG_ROUNDS must be a positive number (got '$PG_ROUNDS')" >&2; exit 2; }
if [[ "$SCENARIO" == churn && "$SMOKE" != 1 && "$PROCESSES" != 1 ]]; then
    echo "error: churn runs in one client process (PROCESSES=1)" >&2
    exit 2
fi
WRITE=0
WRITE_KNOBS=""
for s in "${SCENARIOS[@]}"; do
    if [[ "$s" == write ]]; then
        WRITE=1
        WRITE_KNOBS=" PG_ROUNDS=$PG_ROUNDS PG_CLIENTS=$PG_CLIENTS"
    fi
done
CHURN_RATE="${CHURN_RATE:-$(( CONNECTIONS / 10 > 0 ? CONNECTIONS / 10 : 1 ))}"
SWEEP_NS=()
if [[ -n "$SWEEP" ]]; then
    if [[ "$SMOKE" == 1 || "$SCENARIO" != broadcast ]]; then
        echo "error: SWEEP needs SCENARIO=broadcast (and no SMOKE)" >&2
        exit 2
    fi
    read -r -a SWEEP_NS <<<"$SWEEP"
    for n in "${SWEEP_NS[@]}"; do
        [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "error: SWEEP must be positive connection counts (got '$n')" >&2; exit 2; }
    done
fi

[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "error: ROUNDS must be a positive count (got '$ROUNDS')" >&2; exit 2; }
if (( ROUNDS > 1 )) && [[ "$SMOKE" == 1 || "$SCENARIO" != broadcast || -n "$SWEEP" ]]; then
    echo "error: ROUNDS needs SCENARIO=broadcast (and no SMOKE or SWEEP)" >&2
    exit 2
fi
ROUNDS_KNOB=""
if (( ROUNDS > 1 )); then ROUNDS_KNOB="ROUNDS=$ROUNDS "; fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
COMMAND="SMOKE=$SMOKE SCENARIO=$SCENARIO ${SWEEP:+SWEEP=\"$SWEEP\" }${ROUNDS_KNOB}CONNECTIONS=$CONNECTIONS RATE=${RATE:-default} DURATION=$DURATION WARMUP=$WARMUP SOURCE_ADDRS=$SOURCE_ADDRS PROCESSES=$PROCESSES${WRITE_KNOBS} benches/fanout.sh"

require_tools cargo psql curl jq python3
if (( WRITE )); then require_tools pgbench; fi

# --- build -------------------------------------------------------------------------------------

build_release
FANOUT_BIN="$(require_bench_bin fanout)"
BARE_BIN="$(require_bench_bin bare_peer)"
PLOT_BIN="$(bench_bin plot)"
if (( ${#SWEEP_NS[@]} > 0 )); then
    [[ -n "$PLOT_BIN" && -x "$PLOT_BIN" ]] || { echo "error: the plot bench binary was not built" >&2; exit 1; }
fi

# --- database, servers, token ------------------------------------------------------------------

BARE_PID=""
NODE_PID=""
PGL_PID=""
create_bench_db vibe-fanout BARE_PID NODE_PID PGL_PID
if [[ -z "$RESULTS_DIR" && ${#SWEEP_NS[@]} -gt 0 ]]; then
    RESULTS_DIR="$TARGET_DIR/fanout/sweep-$(date -u +%Y%m%dT%H%M%SZ)"
fi
RESULTS="${RESULTS_DIR:-$WORK}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"

# Servers and client hold one socket per connection: give everyone the hard open-files limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

start_vibe vibe.log
VIBE_URL="$URL"
# The server's own connection ceiling: its open-files limit (the client's can be split over
# processes, the server's cannot).
VIBE_NOFILE="$(awk '/^Max open files/ { print $4 }' "/proc/$SERVER_PID/limits" 2>/dev/null || true)"
mint_token
export VIBE_BENCH_TOKEN="$TOKEN"

BARE_URL=""
needs_bare=0
for s in "${SCENARIOS[@]}"; do [[ "$s" == broadcast || "$s" == idle ]] && needs_bare=1; done
if (( needs_bare )); then
    # Created first: the background job opens it later, and the loop below reads it at once.
    : >"$WORK/bare.log"
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

# start_npm_peer DIR LABEL: `npm ci` in DIR (exactly its package-lock.json), then
# `node DIR/server.js` on the same throwaway database (each peer has its own table). Sets
# PEER_URL and PEER_PID, or PEER_SKIP (why it was not started: no node or npm, or npm ci failed).
start_npm_peer() {
    local dir=$1 label=$2 log
    log="$WORK/$(basename "$dir")"
    PEER_URL="" PEER_PID="" PEER_SKIP=""
    if ! command -v node >/dev/null; then
        PEER_SKIP="node is not installed"
    elif ! command -v npm >/dev/null; then
        PEER_SKIP="npm is not installed"
    else
        echo "==> npm ci in ${dir#"$ROOT"/} (node $(node --version), npm $(npm --version))" >&2
        if ! (cd "$dir" && npm ci --no-audit --no-fund) >"$log-npm.log" 2>&1; then
            sed 's/^/    | /' "$log-npm.log" | tail -n 20 >&2
            PEER_SKIP="npm ci failed in ${dir#"$ROOT"/}"
        fi
    fi
    if [[ -n "$PEER_SKIP" ]]; then
        echo "==> skipping $label: $PEER_SKIP" >&2
        return
    fi
    : >"$log.log"
    DATABASE_URL="$VIBE_DATABASE_URL" PORT=0 node "$dir/server.js" >"$log.log" 2>&1 &
    PEER_PID=$!
    for _ in $(seq 1 300); do
        PEER_URL="$(sed -nE 's/^listening on (http:\/\/[0-9.:]+)$/\1/p' "$log.log" | head -n 1)"
        [[ -n "$PEER_URL" ]] && break
        kill -0 "$PEER_PID" 2>/dev/null || { cat "$log.log" >&2; echo "error: $label exited" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n "$PEER_URL" ]] || { cat "$log.log" >&2; echo "error: $label never printed its address" >&2; exit 1; }
    wait_health "$PEER_URL" "$PEER_PID" "$log.log"
    echo "==> $label on $PEER_URL" >&2
}

# The Node.js peer and PostGraphile (skipped, saying why, without node and npm).
NODE_URL="" NODE_SKIP="" PGL_URL="" PGL_SKIP=""
if (( needs_bare )); then
    if [[ "$NO_NODE" == 1 ]]; then
        NODE_SKIP="NO_NODE=1"
    else
        start_npm_peer "$ROOT/benches/peers/node" "the Node peer"
        NODE_URL=$PEER_URL NODE_PID=$PEER_PID NODE_SKIP=$PEER_SKIP
    fi
    if [[ "$NO_POSTGRAPHILE" == 1 ]]; then
        PGL_SKIP="NO_POSTGRAPHILE=1"
    else
        start_npm_peer "$ROOT/benches/peers/postgraphile" "the PostGraphile peer"
        PGL_URL=$PEER_URL PGL_PID=$PEER_PID PGL_SKIP=$PEER_SKIP
    fi
fi
PEERS=(bare)
if [[ -n "$NODE_URL" ]]; then PEERS+=(node); fi
if [[ -n "$PGL_URL" ]]; then PEERS+=(postgraphile); fi

# --- runs --------------------------------------------------------------------------------------

FAILED=()

# run SCENARIO SERVER URL PID [CONNECTIONS SUFFIX PROCESSES]
#   -> $RESULTS/<scenario>-<server><suffix>.json
run() {
    local scenario=$1 server=$2 url=$3 pid=$4 connections=${5:-$CONNECTIONS} suffix=${6:-}
    local processes=${7:-$PROCESSES} json
    json="$RESULTS/$scenario-$server$suffix.json"
    local args=(--url "$url" --connections "$connections" --duration "$DURATION" --warmup "$WARMUP"
                --drain "$DRAIN" --source-addrs "$SOURCE_ADDRS" --limit "$LIMIT" --server-pid "$pid" --json "$json")
    if (( processes > 1 )); then args+=(--processes "$processes"); fi
    # A document type of its own per run: every run starts with empty windows (no `remove`
    # before LIMIT writes), whatever ran before it on the same server.
    args+=(--type "fanout-$scenario-$server$suffix")
    [[ "$server" == postgraphile ]] && args+=(--protocol graphql-ws)
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
        FAILED+=("$scenario${suffix:+ (N=$connections, processes=$processes)} against $server: $errors errors, $missing missing events; first error: $(jq -r '.first_error // "none"' "$json")")
    fi
}

url_of() { case "$1" in vibe) echo "$VIBE_URL" ;; bare) echo "$BARE_URL" ;; node) echo "$NODE_URL" ;; postgraphile) echo "$PGL_URL" ;; esac; }
pid_of() { case "$1" in vibe) echo "$SERVER_PID" ;; bare) echo "$BARE_PID" ;; node) echo "$NODE_PID" ;; postgraphile) echo "$PGL_PID" ;; esac; }

if (( ${#SWEEP_NS[@]} > 0 )); then
    for n in "${SWEEP_NS[@]}"; do
        for srv in vibe "${PEERS[@]}"; do
            run broadcast "$srv" "$(url_of "$srv")" "$(pid_of "$srv")" "$n" "-$n"
        done
    done
else
    for s in "${SCENARIOS[@]}"; do
        [[ "$s" == write ]] && continue
        if [[ "$s" == broadcast ]] && (( ROUNDS > 1 )); then
            # Every server once per round; which one goes first rotates, so a drift of the
            # machine over the run does not always favour the same server.
            servers=(vibe "${PEERS[@]}")
            for round in $(seq 1 "$ROUNDS"); do
                k=$(( (round - 1) % ${#servers[@]} ))
                for srv in "${servers[@]:k}" "${servers[@]:0:k}"; do
                    run broadcast "$srv" "$(url_of "$srv")" "$(pid_of "$srv")" "$CONNECTIONS" "-r$round"
                done
            done
            continue
        fi
        run "$s" vibe "$VIBE_URL" "$SERVER_PID"
        if [[ "$s" == broadcast || "$s" == idle ]]; then
            for srv in "${PEERS[@]}"; do
                run "$s" "$srv" "$(url_of "$srv")" "$(pid_of "$srv")"
            done
        fi
    done
fi
SMOKE_P2=""
if [[ "$SMOKE" == 1 ]]; then
    SMOKE_P2="rows marked 2 processes: two worker processes, the parent writes"
    # The multi-process client: two worker processes hold the connections, the parent writes.
    run broadcast vibe "$VIBE_URL" "$SERVER_PID" "$CONNECTIONS" -p2 2
    run idle vibe "$VIBE_URL" "$SERVER_PID" "$CONNECTIONS" -p2 2
fi
if grep -qiE 'error|panic' "$WORK/vibe.log"; then
    echo "    vibe server log (warnings and errors):" >&2
    sed 's/^/    | /' "$WORK/vibe.log" | tail -n 20 >&2
fi
for peer in node postgraphile; do
    if [[ -n "$(pid_of "$peer")" ]] && grep -qiE 'error|failed' "$WORK/$peer.log"; then
        echo "    $peer peer log (errors):" >&2
        sed 's/^/    | /' "$WORK/$peer.log" | tail -n 20 >&2
    fi
done

# write: only pgbench may run now. With every server stopped nothing else writes to the database
# (Vibe's feed reader would tick and read the log meanwhile), as in benches/realtime.sh.
if (( WRITE )); then
    echo "==> stopping the servers for the write-overhead runs" >&2
    stop_pid "$NODE_PID"
    NODE_PID=""
    stop_pid "$PGL_PID"
    PGL_PID=""
    stop_pid "$BARE_PID"
    BARE_PID=""
    stop_vibe
    INSERT_CLIENTS="$PG_CLIENTS" INSERT_JOBS=2 INSERT_SECS="$DURATION"
    insert_rounds "$PG_ROUNDS" benchwrite on off plain
fi

# --- report ------------------------------------------------------------------------------------

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else printf "n/a" }'; }
f0() { awk -v x="$1" 'BEGIN { if (x == "null" || x == "") print "n/a"; else printf "%.0f", x }'; }
f1() { awk -v x="$1" 'BEGIN { if (x == "null" || x == "") print "n/a"; else printf "%.1f", x }'; }
f2() { awk -v x="$1" 'BEGIN { if (x == "null" || x == "") print "n/a"; else printf "%.2f", x }'; }
j() { jq -r "$2" "$RESULTS/$1.json"; }
mib() { awk -v x="$1" 'BEGIN { if (x == "null" || x == "") print "n/a"; else printf "%.1f", x / 1024 }'; }
ratio3() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.3f", a / b; else printf "n/a" }'; }
add() { awk -v s="$1" -v x="$2" 'BEGIN { print s + x }'; }
mean() { awk -v s="$1" -v n="$2" 'BEGIN { print s / n }'; }
mean3() { awk -v s="$1" -v n="$2" 'BEGIN { printf "%.3f", s / n }'; }

NODE_VERSION="$(node --version 2>/dev/null || true)"
if (( PROCESSES > 1 )); then
    CLIENT_PROCS="$PROCESSES worker processes hold the connections, the parent writes; client CPU is all of them"
else
    CLIENT_PROCS="one process"
fi
cat <<EOF

## Vibe WebSocket fan-out benchmarks

$(machine_line)
- Vibe: $("$VIBE_BIN" --version), release build; load client (benches/fanout.rs), servers and PostgreSQL share this machine
- command: \`$COMMAND\`
- latency p50 … max: write sent (the writer's clock, \`data.sent_us\`) → \`add\` received, which includes
  the writer's HTTP request; commit p50 / p99: the document's \`updatedAt\` (Vibe's and the Node
  peer's \`now()\` in the writing transaction, taken before the commit; the bare peer's clock when it
  builds the document) → \`add\` received, the commit-to-client latency
- every subscription reads with \`limit\` $LIMIT: once a subscriber's window holds $LIMIT documents, each
  write also sends it a \`remove\` (the "removes" column; every server does, the peers keep the same
  windows), so a write costs each subscriber two frames, not one; each run writes a document type of
  its own, so its windows start empty
- bare = benches/peers/bare.rs (hyper + fastwebsockets, no database: the transport's ceiling);
  node = benches/peers/node (Node.js ${NODE_VERSION:-n/a}, ws + pg, one LISTEN connection fed by a
  per-row NOTIFY trigger; no auth, no ACLs, no resume)${NODE_SKIP:+ — not run: $NODE_SKIP};
  postgraphile = benches/peers/postgraphile (PostGraphile 4 + @graphile/pg-pubsub: a per-row NOTIFY
  trigger, a graphql-ws \`listen\` subscription per connection, each resolving the row with its own
  query; no window, so no \`remove\` events)${PGL_SKIP:+ — not run: $PGL_SKIP};
  server CPU is the server process only (% of one core, over the writing window; the PostgreSQL
  backends of Vibe and of the Node peer are not included)
- load client: $CLIENT_PROCS${SMOKE_P2:+ ($SMOKE_P2)}; open-files limit $(ulimit -n) per process,
  Vibe's own ${VIBE_NOFILE:-unknown} (a server's connection ceiling: it cannot be split)
EOF

load_row() { # file label
    local f=$1 label=$2
    echo "| $label | $(j "$f" .connections) | $(j "$f" .live_queries) | $(j "$f" .rate) | $(j "$f" .writes_ok) | $(j "$f" .events_expected) | $(j "$f" .events_received) | $(j "$f" .events_missing) | $(j "$f" '.removes // 0') | $(f0 "$(j "$f" .events_per_sec)") | $(f2 "$(j "$f" .latency_ms.p50)") | $(f2 "$(j "$f" .latency_ms.p90)") | $(f2 "$(j "$f" .latency_ms.p99)") | $(f2 "$(j "$f" .latency_ms.p99_9)") | $(f2 "$(j "$f" .latency_ms.max)") | $(f2 "$(j "$f" .commit_latency_ms.p50)") | $(f2 "$(j "$f" .commit_latency_ms.p99)") | $(j "$f" .errors) | $(f0 "$(j "$f" .cpu.server_cpu_percent)")% | $(mib "$(j "$f" .cpu.server_rss_kib)") | $(f0 "$(j "$f" .cpu.client_cpu_percent)")% |"
}
load_header() {
    echo
    echo "| server | connections | live queries | writes/s | writes | events expected | received | missing | removes | events/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | commit p50 ms | commit p99 ms | errors | server CPU | server RSS MiB | client CPU |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
}
# ratio_of SCENARIO FIELD [PEER] -> Vibe / PEER (default bare) of one field of that scenario's runs
ratio_of() { ratio "$(j "$1-vibe" "$2")" "$(j "$1-${3:-bare}" "$2")"; }
label_of() { case "$1" in vibe) echo Vibe ;; *) echo "$1" ;; esac; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# load_ratio_row SCENARIO PEER [SUFFIX] -> the "Vibe / PEER" row of a load table
load_ratio_row() {
    local s=$1 peer=$2 suffix=${3:-} field r=()
    for field in .events_per_sec .latency_ms.p50 .latency_ms.p90 .latency_ms.p99 .latency_ms.p99_9 \
                 .latency_ms.max .commit_latency_ms.p50 .commit_latency_ms.p99 \
                 .cpu.server_cpu_percent .cpu.server_rss_kib .cpu.client_cpu_percent; do
        r+=("$(ratio "$(j "$s-vibe$suffix" "$field")" "$(j "$s-$peer$suffix" "$field")")")
    done
    echo "| Vibe / $peer | ${suffix#-} | | | | | | | | ${r[0]} | ${r[1]} | ${r[2]} | ${r[3]} | ${r[4]} | ${r[5]} | ${r[6]} | ${r[7]} | | ${r[8]} | ${r[9]} | ${r[10]} |"
}

for s in "${SCENARIOS[@]}"; do
    case "$s" in
        broadcast)
            if (( ${#SWEEP_NS[@]} > 0 )); then
                echo
                echo "### broadcast sweep: N = ${SWEEP_NS[*]} subscribers of one live query"
                load_header
                for n in "${SWEEP_NS[@]}"; do
                    for srv in vibe "${PEERS[@]}"; do load_row "broadcast-$srv-$n" "$(label_of "$srv")"; done
                    for srv in "${PEERS[@]}"; do load_ratio_row broadcast "$srv" "-$n"; done
                done
                continue
            fi
            if (( ROUNDS > 1 )); then
                echo
                echo "### broadcast: $CONNECTIONS subscribers of one live query, $ROUNDS rounds (every server once per round; the first one rotates)"
                load_header
                for round in $(seq 1 "$ROUNDS"); do
                    for srv in vibe "${PEERS[@]}"; do load_row "broadcast-$srv-r$round" "$(label_of "$srv") r$round"; done
                    for srv in "${PEERS[@]}"; do load_ratio_row broadcast "$srv" "-r$round"; done
                done
                echo
                for srv in "${PEERS[@]}"; do
                    p50s=() p99s=() c99s=()
                    for round in $(seq 1 "$ROUNDS"); do
                        p50s+=("$(ratio "$(j "broadcast-vibe-r$round" .latency_ms.p50)" "$(j "broadcast-$srv-r$round" .latency_ms.p50)")")
                        p99s+=("$(ratio "$(j "broadcast-vibe-r$round" .latency_ms.p99)" "$(j "broadcast-$srv-r$round" .latency_ms.p99)")")
                        c99s+=("$(ratio "$(j "broadcast-vibe-r$round" .commit_latency_ms.p99)" "$(j "broadcast-$srv-r$round" .commit_latency_ms.p99)")")
                    done
                    echo "- Vibe / $srv, median of the $ROUNDS rounds' ratios: p50 $(median "${p50s[@]}") (${p50s[*]}), p99 $(median "${p99s[@]}") (${p99s[*]}), commit p99 $(median "${c99s[@]}") (${c99s[*]})"
                done
                continue
            fi
            echo
            echo "### broadcast: $CONNECTIONS subscribers of one live query"
            load_header
            load_row broadcast-vibe Vibe
            if [[ -n "$SMOKE_P2" ]]; then load_row broadcast-vibe-p2 "Vibe (2 processes)"; fi
            for srv in "${PEERS[@]}"; do load_row "broadcast-$srv" "$srv"; done
            for srv in "${PEERS[@]}"; do load_ratio_row broadcast "$srv"; done
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
            idle_files=(idle-vibe)
            if [[ -n "$SMOKE_P2" ]]; then idle_files+=(idle-vibe-p2); fi
            for srv in "${PEERS[@]}"; do idle_files+=("idle-$srv"); done
            for f in "${idle_files[@]}"; do
                srv="${f#idle-}"
                label="$(label_of "${srv%-p2}")"
                if [[ "$srv" == *-p2 ]]; then label+=" (2 processes)"; fi
                echo "| $label | $(j "$f" .connections) | $(j "$f" .opened) | $(f2 "$(j "$f" .connect_secs)") | $(f0 "$(j "$f" .connects_per_sec)") | $(j "$f" .connect_errors) | $(j "$f" .disconnected) | $(mib "$(j "$f" .server_rss_before_kib)") | $(mib "$(j "$f" .server_rss_after_kib)") | $(f0 "$(j "$f" .server_bytes_per_connection)") | $(f0 "$(j "$f" .client_bytes_per_connection)") |"
            done
            for srv in "${PEERS[@]}"; do
                echo "| Vibe / $srv | | | $(ratio_of idle .connect_secs "$srv") | $(ratio_of idle .connects_per_sec "$srv") | | | | | $(ratio_of idle .server_bytes_per_connection "$srv") | |"
            done
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
        write)
            echo
            echo "### write: single-row inserts, change feed on vs off, and a plain table (pgbench, servers stopped)"
            echo
            echo "- \`pgbench $INSERT_PGBENCH -f insert.sql\`, one INSERT per transaction:"
            echo "  on / off: \`${INSERT_STATEMENT[on]}\` with the change feed's column defaults (\`log_xid\`, \`log_seq\`: each row"
            echo "  marked for the feed, in a partial index) as shipped / dropped;"
            echo "  plain: the same row into \`$PLAIN_TABLE\` (the columns of documents without the generated ACL columns and the marks, primary key only)"
            echo "- before each run: the defaults set and checked, then \`CHECKPOINT\`; after it the marked rows must have grown by exactly the"
            echo "  run's transactions (on) or not at all (off, plain), and the change log not at all; the first case rotates each round;"
            echo "  the mean row averages the rounds' tps and their per-round ratios"
            echo
            echo "| round (order) | feed on, tps | feed off, tps | plain table, tps | on / off | on / plain | off / plain |"
            echo "|---|---|---|---|---|---|---|"
            sum_on=0 sum_off=0 sum_plain=0 sum_r1=0 sum_r2=0 sum_r3=0
            for round in $(seq 1 "$PG_ROUNDS"); do
                t_on="${INSERT_TPS["on $round"]}" t_off="${INSERT_TPS["off $round"]}" t_plain="${INSERT_TPS["plain $round"]}"
                r1="$(ratio3 "$t_on" "$t_off")" r2="$(ratio3 "$t_on" "$t_plain")" r3="$(ratio3 "$t_off" "$t_plain")"
                echo "| $round (${INSERT_ORDER[$round]}) | $(f0 "$t_on") | $(f0 "$t_off") | $(f0 "$t_plain") | $r1 | $r2 | $r3 |"
                sum_on="$(add "$sum_on" "$t_on")" sum_off="$(add "$sum_off" "$t_off")" sum_plain="$(add "$sum_plain" "$t_plain")"
                sum_r1="$(add "$sum_r1" "$r1")" sum_r2="$(add "$sum_r2" "$r2")" sum_r3="$(add "$sum_r3" "$r3")"
            done
            mean_r1="$(mean3 "$sum_r1" "$PG_ROUNDS")"
            echo "| mean | $(f0 "$(mean "$sum_on" "$PG_ROUNDS")") | $(f0 "$(mean "$sum_off" "$PG_ROUNDS")") | $(f0 "$(mean "$sum_plain" "$PG_ROUNDS")") | $mean_r1 | $(mean3 "$sum_r2" "$PG_ROUNDS") | $(mean3 "$sum_r3" "$PG_ROUNDS") |"
            echo
            echo "target: feed on ≥ 0.90 of feed off: $(awk -v r="$mean_r1" 'BEGIN { print (r >= 0.90 ? "met" : "missed") }') ($mean_r1, mean of $PG_ROUNDS rounds)"
            ;;
    esac
done

# --- sweep chart ---------------------------------------------------------------------------------

if (( ${#SWEEP_NS[@]} > 0 )); then
    PLOT="$RESULTS/fanout-sweep.svg"
    plot_args=(--out "$PLOT" --title "Vibe WebSocket fan-out: broadcast, ${RATE:-100} writes/s, $(nproc) CPUs")
    for srv in vibe "${PEERS[@]}"; do
        for n in "${SWEEP_NS[@]}"; do plot_args+=("$srv=$RESULTS/broadcast-$srv-$n.json"); done
    done
    "$PLOT_BIN" "${plot_args[@]}" >/dev/null
    echo
    echo "JSON results: $RESULTS"
    echo "chart: $PLOT"
    if command -v rsvg-convert >/dev/null && rsvg-convert -b white "$PLOT" -o "${PLOT%.svg}.png"; then
        echo "chart as PNG: ${PLOT%.svg}.png"
    fi
    if [[ "$SAVE_PLOT" == 1 ]]; then
        cp "$PLOT" "$ROOT/docs/fanout-sweep.svg"
        echo "copied to docs/fanout-sweep.svg"
    fi
elif [[ -n "$RESULTS_DIR" ]]; then
    echo
    echo "JSON results: $RESULTS"
fi

if (( ${#FAILED[@]} > 0 )); then
    echo
    printf -- '- FAILED: %s\n' "${FAILED[@]}"
    if [[ "$SMOKE" == 1 ]]; then
        exit 1
    fi
fi
