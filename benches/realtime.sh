#!/usr/bin/env bash
# Vibe realtime benchmarks: WebSocket fan-out latency, and what the change feed costs PostgreSQL
# on inserts.
#
#   benches/realtime.sh                                   # SUBSCRIBERS=1000 RATE=100 DURATION=20
#   SUBSCRIBERS=50 RATE=20 DURATION=3 benches/realtime.sh # a quick smoke run
#
# Needs: cargo, psql, pgbench, curl, jq, python3, and a PostgreSQL 13+ at 127.0.0.1:5432 that
# lets user `postgres` in without a password (trust). Creates a throwaway database
# vibe_bench_<random>, starts a release `vibe serve` on it at a free 127.0.0.1 port, and runs:
#   (a) feed latency: benches/feed_latency.rs opens SUBSCRIBERS WebSockets that all subscribe to
#       the same live query (type benchfeed, global, limit 10); one writer creates RATE documents
#       per second through REST; each subscriber times write sent -> `add` event received.
#   (b) feed write overhead: the server is stopped, then pgbench runs single-row inserts into
#       `documents` (the create statement of rest_vs_pgbench.sh) with the change feed on (rows
#       marked for it by column defaults) and off (the defaults dropped), PG_ROUNDS rounds,
#       alternating which goes first (on/off, off/on, ...).
# Everything is loopback-only; the database, server and data dir are removed on exit.
#
# Env knobs: SUBSCRIBERS (default 1000), RATE (writes/s, default 100), DURATION (seconds per
# measured run, default 20; used by (a) and by each pgbench run of (b)), WARMUP (unmeasured
# seconds of writing before (a) measures, default 3), PG_ROUNDS (default 3), PG_CLIENTS (pgbench
# -c, default 8), CARGO_TARGET_DIR (where the release build goes, default ./target).

set -euo pipefail
shopt -s inherit_errexit
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SUBSCRIBERS="${SUBSCRIBERS:-1000}"
RATE="${RATE:-100}"
DURATION="${DURATION:-20}"
WARMUP="${WARMUP:-3}"
PG_ROUNDS="${PG_ROUNDS:-3}"
PG_CLIENTS="${PG_CLIENTS:-8}"
PG_JOBS=2
FEED_TYPE=benchfeed
INSERT_TYPE=benchdocs
SUBJECT=did:key:zBench
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
COMMAND="SUBSCRIBERS=$SUBSCRIBERS RATE=$RATE DURATION=$DURATION WARMUP=$WARMUP PG_ROUNDS=$PG_ROUNDS PG_CLIENTS=$PG_CLIENTS benches/realtime.sh"

require_tools cargo psql pgbench curl jq python3

# --- build -------------------------------------------------------------------------------------

build_release
FEED_BIN="$(require_bench_bin feed_latency)"

# --- database, server, token -------------------------------------------------------------------

create_bench_db vibe-bench

# The server holds one socket per subscriber too: give it the hard open-files limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

start_vibe server.log "vibe serve"
mint_token

# --- (a) feed latency --------------------------------------------------------------------------

FEED_JSON="$WORK/feed_latency.json"
FEED_ARGS=(--url "$URL" --subscribers "$SUBSCRIBERS" --rate "$RATE" --duration "$DURATION"
           --warmup "$WARMUP" --type "$FEED_TYPE")
echo "==> feed latency: $SUBSCRIBERS subscribers, $RATE writes/s, ${WARMUP}s warmup + ${DURATION}s" >&2
VIBE_BENCH_TOKEN="$TOKEN" "$FEED_BIN" "${FEED_ARGS[@]}" --json "$FEED_JSON" | sed 's/^/    /' >&2
if grep -qiE 'error|panic' "$WORK/server.log"; then
    echo "    server log (warnings and errors):" >&2
    sed 's/^/    | /' "$WORK/server.log" | tail -n 20 >&2
fi

# Only pgbench may run during (b).
echo "==> stopping vibe serve" >&2
stop_vibe

# --- (b) change-feed overhead on inserts ---------------------------------------------------------

# The create statement of rest_vs_pgbench.sh (see insert_sql in lib.sh for how it keeps pgbench
# off its colons), feed on and off, PG_ROUNDS alternating rounds (insert_rounds in lib.sh).
INSERT_CLIENTS="$PG_CLIENTS" INSERT_JOBS="$PG_JOBS" INSERT_SECS="$DURATION"
insert_rounds "$PG_ROUNDS" "$INSERT_TYPE" on off
INSERT_SQL="${INSERT_STATEMENT[on]}"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else printf "n/a" }'; }
int() { awk -v x="$1" 'BEGIN { printf "%.0f", x }'; }
f2() { awk -v x="$1" 'BEGIN { printf "%.2f", x }'; }

PG_ROWS=()
ON_SUM=0
OFF_SUM=0
RATIO_SUM=0
for round in $(seq 1 "$PG_ROUNDS"); do
    tps_on="${INSERT_TPS["on $round"]}"
    tps_off="${INSERT_TPS["off $round"]}"
    r="$(ratio "$tps_on" "$tps_off")"
    PG_ROWS+=("| $round (${INSERT_ORDER[$round]}) | $(int "$tps_on") | $(int "$tps_off") | $r |")
    ON_SUM="$(awk -v s="$ON_SUM" -v x="$tps_on" 'BEGIN { print s + x }')"
    OFF_SUM="$(awk -v s="$OFF_SUM" -v x="$tps_off" 'BEGIN { print s + x }')"
    RATIO_SUM="$(awk -v s="$RATIO_SUM" -v x="$r" 'BEGIN { print s + x }')"
done
ON_MEAN="$(awk -v s="$ON_SUM" -v n="$PG_ROUNDS" 'BEGIN { print s / n }')"
OFF_MEAN="$(awk -v s="$OFF_SUM" -v n="$PG_ROUNDS" 'BEGIN { print s / n }')"
RATIO_MEAN="$(awk -v s="$RATIO_SUM" -v n="$PG_ROUNDS" 'BEGIN { printf "%.3f", s / n }')"

# --- report ------------------------------------------------------------------------------------

MACHINE="$(machine_line)"
feed() { jq -r "$1" "$FEED_JSON"; }

cat <<EOF

## Vibe realtime benchmarks

$MACHINE
- Vibe: $("$VIBE_BIN" --version), release build; load client, server and PostgreSQL share this machine
- command: \`$COMMAND\`

### Fan-out latency (one live query, $SUBSCRIBERS subscribers)

- \`feed_latency --url $URL --token <token> ${FEED_ARGS[*]:2}\` (the client is benches/feed_latency.rs)
- $SUBSCRIBERS WebSocket connections (subprotocol \`vibe.v1\`, token as the second protocol value), each
  sending \`{"op":"read","type":"$FEED_TYPE","global":true,"limit":10}\`: $(feed .live_queries) live query on the server,
  set up in $(f2 "$(feed .setup_secs)")s
- one writer: \`POST /v1/docs/$FEED_TYPE\` at $RATE/s on a fixed-interval ticker (open loop), body
  \`{"acl":{"read":{"allow":["*"]}},"data":{"sent_us":<unix µs just before sending>}}\`;
  ${WARMUP}s of warmup writes, then ${DURATION}s measured; POST round trip p50 $(f2 "$(feed .post_latency_ms.p50)") ms, p99 $(f2 "$(feed .post_latency_ms.p99)") ms
- latency = subscriber's clock on receiving the \`add\` event − \`sent_us\` (REST write, commit, change
  feed, live query, WebSocket), all subscribers' samples merged
- commit-to-client = the same clock − the document's \`updatedAt\` (the writing transaction's \`now()\`,
  taken before its commit): p50 $(f2 "$(feed .commit_latency_ms.p50)") ms, p90 $(f2 "$(feed .commit_latency_ms.p90)") ms, p99 $(f2 "$(feed .commit_latency_ms.p99)") ms, p99.9 $(f2 "$(feed .commit_latency_ms.p99_9)") ms, max $(f2 "$(feed .commit_latency_ms.max)") ms
- expected events = measured writes answered 2xx × subscribers; anything not received within 5s after
  the last write is missing

| subscribers | writes/s | writes (measured) | events expected | received | missing | delivered events/s | p50 | p90 | p99 | p99.9 | max | connect errors | disconnects |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| $SUBSCRIBERS | $RATE | $(feed .writes_ok) | $(feed .events_expected) | $(feed .events_received) | $(feed .events_missing) | $(int "$(feed .events_per_sec)") | $(f2 "$(feed .latency_ms.p50)") ms | $(f2 "$(feed .latency_ms.p90)") ms | $(f2 "$(feed .latency_ms.p99)") ms | $(f2 "$(feed .latency_ms.p99_9)") ms | $(f2 "$(feed .latency_ms.max)") ms | $(feed .connect_errors) | $(feed .disconnected) |

### Change-feed overhead on inserts (pgbench, server stopped)

- \`pgbench $INSERT_PGBENCH -f create.sql\` with create.sql:
  \`$INSERT_SQL\`
- before each run: the change feed's column defaults on \`documents\` (\`log_xid\`, \`log_seq\`: every inserted row marked
  for the feed, in a partial index; migrations/0013) set as shipped or dropped, then \`CHECKPOINT\`
- ratio = tps with the feed / tps without; the mean row averages the rounds (ratio: mean of the
  per-round ratios)

| round (order) | feed on, tps | feed off, tps | ratio on/off |
|---|---|---|---|
EOF
printf '%s\n' "${PG_ROWS[@]}"
echo "| mean | $(int "$ON_MEAN") | $(int "$OFF_MEAN") | $RATIO_MEAN |"

NOTES=()
(( $(feed .write_errors) + $(feed .warmup_write_errors) > 0 )) \
    && NOTES+=("- feed: $(feed .write_errors) measured and $(feed .warmup_write_errors) warmup writes failed.")
(( $(feed .resets) + $(feed .bad_frames) > 0 )) \
    && NOTES+=("- feed: $(feed .resets) reset events, $(feed .bad_frames) unreadable frames.")
(( $(feed .late_ticks) > 0 )) \
    && NOTES+=("- feed: the writer sent $(feed .late_ticks) writes more than one interval late (the client could not keep the rate).")
first_error="$(feed '.first_error // .first_connect_error // empty')"
[[ -n "$first_error" ]] && NOTES+=("- feed, first error: $first_error")
if (( ${#NOTES[@]} > 0 )); then
    echo
    printf '%s\n' "${NOTES[@]}"
fi
