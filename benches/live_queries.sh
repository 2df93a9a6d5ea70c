#!/usr/bin/env bash
# Live queries at scale: QUERIES live queries with distinct parameters on one node, RATE changes
# per second, and what routing them costs — per-change routing time (in process on the pure cores,
# against the naive scan of every query; and the server's own vibe_live_query_match_seconds) and
# server memory per idle live query (RSS before and after subscribing).
#
#   benches/live_queries.sh                                     # QUERIES=100000 RATE=1000 DURATION=20
#   QUERIES=2000 RATE=200 DURATION=3 benches/live_queries.sh   # a quick smoke run
#
# Needs: cargo, psql, curl, python3, and a PostgreSQL 13+ at 127.0.0.1:5432 that lets user
# `postgres` in without a password (trust). Creates a throwaway database vibe_bench_<random>,
# starts a release `vibe serve` on it at a free 127.0.0.1 port, runs benches/live_queries.rs
# against it, and removes everything on exit. Loopback only.
#
# Env knobs: QUERIES (default 100000), PER_CONNECTION (subscriptions per WebSocket, default 250),
# RATE (changes/s, default 1000), DURATION (seconds of writing, default 20), JSON (write the
# report there too), CARGO_TARGET_DIR (where the release build goes, default ./target).

set -euo pipefail
shopt -s inherit_errexit
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

QUERIES="${QUERIES:-100000}"
PER_CONNECTION="${PER_CONNECTION:-250}"
RATE="${RATE:-1000}"
DURATION="${DURATION:-20}"
SUBJECT=did:key:zBench
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

require_tools cargo psql curl python3
build_release
LQ_BIN="$(require_bench_bin live_queries)"
create_bench_db vibe-lq
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# A live query lingers after its last subscriber; this run never resubscribes.
export VIBE_WS__LINGER=0s
start_vibe server.log "vibe serve"
mint_token

echo "==> QUERIES=$QUERIES PER_CONNECTION=$PER_CONNECTION RATE=$RATE DURATION=$DURATION benches/live_queries.sh" >&2
echo "    machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)" >&2
ARGS=(--url "$URL" --database-url "$VIBE_DATABASE_URL" --server-pid "$SERVER_PID"
      --owner "$SUBJECT" --queries "$QUERIES" --per-connection "$PER_CONNECTION"
      --rate "$RATE" --duration "$DURATION")
if [[ -n "${JSON:-}" ]]; then ARGS+=(--json "$JSON"); fi
VIBE_BENCH_TOKEN="$TOKEN" "$LQ_BIN" "${ARGS[@]}"
if grep -qiE 'error|panic' "$WORK/server.log"; then
    echo "    server log (warnings and errors):" >&2
    sed 's/^/    | /' "$WORK/server.log" | tail -n 20 >&2
fi
