#!/usr/bin/env bash
# SFU forwarding capacity: one call room on a release `vibe serve`, P publishers sending synthetic
# VP8 video and S receive-only subscribers, all str0m peers of benches/sfu_load.rs over UDP on
# 127.0.0.1 (signalling over each one's WebSocket). Forwarded video streams: P × (P + S − 1).
# Reports, over a steady window: delivery (loss), per-subscriber bitrate, the server's CPU and
# the client's (they share this machine), forwarded streams per server core, the SFU's added
# latency (the server's vibe_call_forward_latency_seconds over the window) and end to end.
#
#   PUBLISHERS=4 SUBSCRIBERS=76 BITRATE_KBPS=1000 DURATION=15 WARMUP=5 benches/sfu.sh
#   SWEEP="4:20 4:40 4:76 10:25" DURATION=15 benches/sfu.sh
#                              # one run per PUBLISHERS:SUBSCRIBERS pair, same server, a fresh
#                              # room each
#   SMOKE=1 benches/sfu.sh     # 2 publishers, 1 subscriber, 3 s; non-zero exit if nothing was
#                              # forwarded (for CI)
#
# Needs: cargo, psql, curl, jq, python3, and a PostgreSQL 13+ at 127.0.0.1:5432 that lets user
# `postgres` in without a password (trust). Creates a throwaway database, starts `vibe serve`
# with its default config except `calls.max_participants` (VIBE_CALLS__MAX_PARTICIPANTS, raised
# to 1000 for the run), mints one token (read:call write:call) whose subject owns the room
# documents (each WebSocket is its own participant), and removes everything on exit.
#
# Env knobs: VIBE_CALLS__* (passed to the server, e.g. VIBE_CALLS__BANDWIDTH_ESTIMATION=false),
# PUBLISHERS (4), SUBSCRIBERS (76), SWEEP (space-separated P:S pairs; overrides
# PUBLISHERS and SUBSCRIBERS), BITRATE_KBPS (per publisher, 1000), FPS (30), AUDIO (1: publishers
# also send 50 audio frames/s), DURATION (measured s, 15), WARMUP (s, 5), CLIENT_THREADS (the
# load client's runtime threads, 1), SMOKE (0), RESULTS_DIR (JSON results; default: a temporary
# folder removed on exit), CARGO_TARGET_DIR (./target).

set -euo pipefail
shopt -s inherit_errexit
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SMOKE="${SMOKE:-0}"
PUBLISHERS="${PUBLISHERS:-4}"
SUBSCRIBERS="${SUBSCRIBERS:-76}"
SWEEP="${SWEEP:-}"
BITRATE_KBPS="${BITRATE_KBPS:-1000}"
FPS="${FPS:-30}"
AUDIO="${AUDIO:-0}"
DURATION="${DURATION:-15}"
WARMUP="${WARMUP:-5}"
CLIENT_THREADS="${CLIENT_THREADS:-1}"
RESULTS_DIR="${RESULTS_DIR:-}"
if [[ "$SMOKE" == 1 ]]; then
    PUBLISHERS=2 SUBSCRIBERS=1 SWEEP="" DURATION=3 WARMUP=1
fi
SUBJECT=did:key:zSfuBench
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres

RUNS=()
if [[ -n "$SWEEP" ]]; then
    read -r -a RUNS <<<"$SWEEP"
else
    RUNS=("$PUBLISHERS:$SUBSCRIBERS")
fi
for run in "${RUNS[@]}"; do
    [[ "$run" =~ ^[1-9][0-9]*:[0-9]+$ ]] \
        || { echo "error: runs are PUBLISHERS:SUBSCRIBERS with PUBLISHERS ≥ 1 (got '$run')" >&2; exit 2; }
done
for knob in BITRATE_KBPS FPS CLIENT_THREADS; do
    [[ "${!knob}" =~ ^[1-9][0-9]*$ ]] || { echo "error: $knob must be a positive number (got '${!knob}')" >&2; exit 2; }
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Other [calls] settings given to the server (VIBE_CALLS__BANDWIDTH_ESTIMATION=false, say) go into
# the report's command line.
SERVER_KNOBS="$(env | grep -E '^VIBE_CALLS__' | grep -v '^VIBE_CALLS__MAX_PARTICIPANTS=' | sort | tr '\n' ' ' || true)"
if [[ -n "$SWEEP" ]]; then
    COMMAND="${SERVER_KNOBS}SWEEP=\"$SWEEP\" BITRATE_KBPS=$BITRATE_KBPS FPS=$FPS AUDIO=$AUDIO DURATION=$DURATION WARMUP=$WARMUP CLIENT_THREADS=$CLIENT_THREADS benches/sfu.sh"
else
    COMMAND="${SERVER_KNOBS}SMOKE=$SMOKE PUBLISHERS=$PUBLISHERS SUBSCRIBERS=$SUBSCRIBERS BITRATE_KBPS=$BITRATE_KBPS FPS=$FPS AUDIO=$AUDIO DURATION=$DURATION WARMUP=$WARMUP CLIENT_THREADS=$CLIENT_THREADS benches/sfu.sh"
fi

require_tools cargo psql curl jq python3
build_release
SFU_BIN="$(require_bench_bin sfu_load)"
create_bench_db vibe-sfu
RESULTS="${RESULTS_DIR:-$WORK}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# Everything else default: one room holds every participant of a run.
export VIBE_CALLS__MAX_PARTICIPANTS=1000
start_vibe vibe.log
# The server's log goes to stdout too; the token is the command's last line.
TOKEN="$("$VIBE_BIN" token mint --sub "$SUBJECT" --scope read:call --scope write:call --ttl 24h | tail -n 1)"
[[ -n "$TOKEN" ]] || { echo "error: token mint printed nothing" >&2; exit 1; }
export VIBE_BENCH_TOKEN="$TOKEN"

FAILED=()
i=0
for run in "${RUNS[@]}"; do
    i=$(( i + 1 ))
    p="${run%%:*}"
    s="${run##*:}"
    # A fresh room per run (its owner, the token's subject, may join it from every connection).
    room="$(curl -fsS -X POST "$URL/v1/docs/call" -H "authorization: Bearer $TOKEN" \
        -H 'content-type: application/json' -d "{\"data\": {\"title\": \"sfu bench $run\"}}" | jq -r .id)"
    [[ -n "$room" && "$room" != null ]] || { echo "error: could not create the call document" >&2; exit 1; }
    json="$RESULTS/sfu-$(printf %02d "$i")-${p}x${s}.json"
    args=(--url "$URL" --room "$room" --publishers "$p" --subscribers "$s" --bitrate-kbps "$BITRATE_KBPS"
          --fps "$FPS" --duration "$DURATION" --warmup "$WARMUP" --threads "$CLIENT_THREADS"
          --server-pid "$SERVER_PID" --json "$json")
    if [[ "$AUDIO" == 1 ]]; then args+=(--audio); fi
    echo "==> run $i: $p publishers × $s subscribers ($(( p * (p + s - 1) )) forwarded video streams): sfu_load ${args[*]}" >&2
    if ! "$SFU_BIN" "${args[@]}" | sed 's/^/    /' >&2; then
        FAILED+=("run $i ($run): sfu_load failed")
        continue
    fi
    received="$(jq -r '.frames_received' "$json")"
    forwarded="$(jq -r '.server_forwarded_frames_per_s | floor' "$json")"
    if (( received == 0 || forwarded == 0 )); then
        FAILED+=("run $i ($run): nothing forwarded (frames received $received, server forwarded/s $forwarded)")
    fi
    # Let the room stop before the next run.
    sleep 1
done

echo
echo "## SFU forwarding capacity: \`$COMMAND\`"
echo
machine_line
echo "- one room; video $BITRATE_KBPS kbit/s at $FPS fps per publisher$( [[ "$AUDIO" == 1 ]] && echo ' plus audio' ); client and server on the same machine; CPU in % of one core"
echo
echo "| P × S | forwarded video streams | settled after | delivered | per subscriber | server CPU | streams per server core | server µs per forwarded frame | client CPU | SFU added p50 / p99 ms | ≤ 1 ms | subscribers' end to end p50 / p99 ms |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for json in "$RESULTS"/sfu-*.json; do
    [[ -e "$json" ]] || continue
    jq -r '"| \(.publishers) × \(.subscribers) | \(.forwarded_video_streams) | \(if .settled then "\(.settled_s | floor) s" else "not in \(.settled_s | floor) s" end) | \(.delivery * 100 | . * 1000 | round / 1000)% | \(.subscriber_mbps | . * 100 | round / 100) Mbit/s | \(.server_cpu_percent // 0 | round)% | \(.streams_per_server_core // 0 | round) | \(.server_cpu_us_per_forwarded_frame // 0 | . * 10 | round / 10) | \(.client_cpu_percent | round)% | \(.forward_latency.p50_ms // 0 | . * 1000 | round / 1000) / \(.forward_latency.p99_ms // 0 | . * 1000 | round / 1000) | \(.forward_latency.share_le_1ms // 0 | . * 1000 | round / 10)% | \(.end_to_end_ms.subscribers.p50 | . * 100 | round / 100) / \(.end_to_end_ms.subscribers.p99 | . * 100 | round / 100) |"' "$json"
done

if (( ${#FAILED[@]} > 0 )); then
    printf 'error: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
