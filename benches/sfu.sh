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
#   TARGETS="vibe janus" SWEEP="4:76 10:25" DURATION=15 WARMUP=5 benches/sfu.sh
#                              # the same runs on Vibe, then on Janus (the reference SFU), and a
#                              # side-by-side table
#
# Targets (TARGETS, default vibe): `vibe` and `janus`. For `janus` the script starts `janus`
# (Debian package `janus`, 1.x) with the configs of benches/peers/janus/ (copied to the work
# folder, placeholders filled in): the videoroom plugin and the HTTP transport only, the API on a
# free 127.0.0.1 port. Janus gathers no loopback candidates, so its ICE and the load client's
# peers use one of this host's own IPv4 addresses (JANUS_MEDIA_IP; the kernel still delivers the
# datagrams over its loopback device). sfu_load --target janus creates a fresh videoroom per run
# (bitrate 0: no REMB) and drives it over the REST API; the server's CPU is the janus process's.
# Janus has no forwarding metrics: its "SFU added" latency is not known (end to end is) and
# forwarded frames are counted at the receivers. One server runs at a time: every run on Vibe,
# Vibe stopped, then every run on Janus.
#
# Needs: cargo, curl, jq, python3; for vibe psql and a PostgreSQL 13+ at 127.0.0.1:5432 that
# lets user `postgres` in without a password (trust); for janus the `janus` binary and `ip`.
# Creates a throwaway database, starts `vibe serve` with its default config except
# `calls.max_participants` (VIBE_CALLS__MAX_PARTICIPANTS, raised to 1000 for the run), mints one
# token (read:call write:call) whose subject owns the room documents (each WebSocket is its own
# participant), and removes everything on exit.
#
# Env knobs: TARGETS (vibe), VIBE_CALLS__* (passed to the server, e.g.
# VIBE_CALLS__BANDWIDTH_ESTIMATION=false), PUBLISHERS (4), SUBSCRIBERS (76), SWEEP
# (space-separated P:S pairs; overrides PUBLISHERS and SUBSCRIBERS), BITRATE_KBPS (per publisher,
# 1000), FPS (30), AUDIO (1: publishers also send 50 audio frames/s), DURATION (measured s, 15),
# WARMUP (s, 5), CLIENT_THREADS (the load client's runtime threads, 1), SMOKE (0), RESULTS_DIR
# (JSON results; default: a temporary folder removed on exit), CARGO_TARGET_DIR (./target);
# for janus: JANUS_LIB (the parent of Janus's plugins/ and transports/; found from
# libjanus_videoroom.so), JANUS_RTP_PORTS (20000-29999), JANUS_DEBUG_LEVEL (3), JANUS_MEDIA_IP
# (default: this host's source address towards 1.1.1.1, else its first non-loopback IPv4),
# JANUS_EVENT_LOOPS (0: Janus's default, a thread per handle; N: N shared event loops). With
# VIBE_CALLS__BIND set to a specific address, Vibe's runs put the peers on it too.

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
TARGETS="${TARGETS:-vibe}"
JANUS_RTP_PORTS="${JANUS_RTP_PORTS:-20000-29999}"
JANUS_DEBUG_LEVEL="${JANUS_DEBUG_LEVEL:-3}"
JANUS_EVENT_LOOPS="${JANUS_EVENT_LOOPS:-0}"
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
read -r -a TARGET_LIST <<<"$TARGETS"
(( ${#TARGET_LIST[@]} > 0 )) || { echo "error: TARGETS is empty" >&2; exit 2; }
HAS_VIBE=""
HAS_JANUS=""
for target in "${TARGET_LIST[@]}"; do
    case "$target" in
        vibe) HAS_VIBE=1 ;;
        janus) HAS_JANUS=1 ;;
        *) echo "error: TARGETS holds vibe and/or janus (got '$target')" >&2; exit 2 ;;
    esac
done
[[ "$JANUS_EVENT_LOOPS" =~ ^[0-9]+$ ]] || { echo "error: JANUS_EVENT_LOOPS must be a number (got '$JANUS_EVENT_LOOPS')" >&2; exit 2; }
[[ "$JANUS_RTP_PORTS" =~ ^[0-9]+-[0-9]+$ ]] || { echo "error: JANUS_RTP_PORTS is MIN-MAX (got '$JANUS_RTP_PORTS')" >&2; exit 2; }
for knob in BITRATE_KBPS FPS CLIENT_THREADS; do
    [[ "${!knob}" =~ ^[1-9][0-9]*$ ]] || { echo "error: $knob must be a positive number (got '${!knob}')" >&2; exit 2; }
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Other [calls] settings given to the server (VIBE_CALLS__BANDWIDTH_ESTIMATION=false, say) go into
# the report's command line.
SERVER_KNOBS="$(env | grep -E '^VIBE_CALLS__' | grep -v '^VIBE_CALLS__MAX_PARTICIPANTS=' | sort | tr '\n' ' ' || true)"
if [[ "$TARGETS" != vibe ]]; then
    SERVER_KNOBS="${SERVER_KNOBS}TARGETS=\"$TARGETS\" "
fi
if [[ -n "$HAS_JANUS" && "$JANUS_EVENT_LOOPS" != 0 ]]; then
    SERVER_KNOBS="${SERVER_KNOBS}JANUS_EVENT_LOOPS=$JANUS_EVENT_LOOPS "
fi
if [[ -n "$SWEEP" ]]; then
    COMMAND="${SERVER_KNOBS}SWEEP=\"$SWEEP\" BITRATE_KBPS=$BITRATE_KBPS FPS=$FPS AUDIO=$AUDIO DURATION=$DURATION WARMUP=$WARMUP CLIENT_THREADS=$CLIENT_THREADS benches/sfu.sh"
else
    COMMAND="${SERVER_KNOBS}SMOKE=$SMOKE PUBLISHERS=$PUBLISHERS SUBSCRIBERS=$SUBSCRIBERS BITRATE_KBPS=$BITRATE_KBPS FPS=$FPS AUDIO=$AUDIO DURATION=$DURATION WARMUP=$WARMUP CLIENT_THREADS=$CLIENT_THREADS benches/sfu.sh"
fi

require_tools cargo curl jq python3
if [[ -n "$HAS_VIBE" ]]; then require_tools psql; fi
if [[ -n "$HAS_JANUS" ]]; then
    require_tools janus
    JANUS_LIB="${JANUS_LIB:-$(dirname "$(dirname "$(find /usr/lib /usr/local/lib /opt/janus/lib -name libjanus_videoroom.so -print -quit 2>/dev/null || true)")")}"
    [[ -e "$JANUS_LIB/plugins/libjanus_videoroom.so" && -e "$JANUS_LIB/transports/libjanus_http.so" ]] \
        || { echo "error: no Janus videoroom plugin / HTTP transport under '$JANUS_LIB' (set JANUS_LIB)" >&2; exit 1; }
    JANUS_VERSION="$(janus --help 2>&1 | sed -n 's/^Janus version: .*(\(.*\))$/\1/p' | head -n 1)"
    # Janus gathers no loopback candidates: its media goes over this host's own IPv4 address
    # (the kernel still delivers it locally, over the loopback device).
    JANUS_MEDIA_IP="${JANUS_MEDIA_IP:-$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1 || true)}"
    if [[ -z "$JANUS_MEDIA_IP" ]]; then
        JANUS_MEDIA_IP="$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$' | grep -v '^127\.' | head -n 1 || true)"
    fi
    [[ "$JANUS_MEDIA_IP" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] \
        || { echo "error: no non-loopback IPv4 address for Janus's ICE (set JANUS_MEDIA_IP)" >&2; exit 1; }
fi
build_release
SFU_BIN="$(require_bench_bin sfu_load)"
JANUS_PID=""
if [[ -n "$HAS_VIBE" ]]; then
    create_bench_db vibe-sfu JANUS_PID
else
    # No database: only the work folder, and the same cleanup on exit.
    WORK="$(mktemp -d -t vibe-sfu.XXXXXX)"
    DATA_DIR=""
    SERVER_PID=""
    DB_CREATED=""
    trap "bench_cleanup SERVER_PID JANUS_PID" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
fi
RESULTS="${RESULTS_DIR:-$WORK}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_janus: janus with benches/peers/janus/*.jcfg (placeholders filled in) from $WORK/janus,
# HTTP on a free 127.0.0.1 port; sets JANUS_URL and JANUS_PID once its API answers.
start_janus() {
    local conf="$WORK/janus" port f
    mkdir -p "$conf"
    port="$(free_port)"
    for f in "$ROOT"/benches/peers/janus/*.jcfg; do
        sed -e "s|@CONFIGS_DIR@|$conf|g" -e "s|@JANUS_LIB@|$JANUS_LIB|g" -e "s|@HTTP_PORT@|$port|g" \
            -e "s|@RTP_PORTS@|$JANUS_RTP_PORTS|g" -e "s|@DEBUG_LEVEL@|$JANUS_DEBUG_LEVEL|g" \
            -e "s|@MEDIA_IP@|$JANUS_MEDIA_IP|g" -e "s|@EVENT_LOOPS@|$JANUS_EVENT_LOOPS|g" \
            "$f" >"$conf/$(basename "$f")"
    done
    JANUS_URL="http://127.0.0.1:$port/janus"
    echo "==> starting janus $JANUS_VERSION on $JANUS_URL (configs in $conf)" >&2
    janus --configs-folder "$conf" --config "$conf/janus.jcfg" >"$WORK/janus.log" 2>&1 &
    JANUS_PID=$!
    for _ in $(seq 1 300); do
        curl -fsS -X POST "$JANUS_URL" -d '{"janus": "info", "transaction": "up"}' >/dev/null 2>&1 && return 0
        if ! kill -0 "$JANUS_PID" 2>/dev/null; then
            echo "error: janus exited; its log:" >&2
            cat "$WORK/janus.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "error: janus never answered on $JANUS_URL; its log:" >&2
    cat "$WORK/janus.log" >&2
    exit 1
}

FAILED=()
for target in "${TARGET_LIST[@]}"; do
    case "$target" in
        vibe)
            # Everything else default: one room holds every participant of a run.
            export VIBE_CALLS__MAX_PARTICIPANTS=1000
            start_vibe vibe.log
            # The server's log goes to stdout too; the token is the command's last line.
            TOKEN="$("$VIBE_BIN" token mint --sub "$SUBJECT" --scope read:call --scope write:call --ttl 24h | tail -n 1)"
            [[ -n "$TOKEN" ]] || { echo "error: token mint printed nothing" >&2; exit 1; }
            export VIBE_BENCH_TOKEN="$TOKEN"
            pid=$SERVER_PID
            ;;
        janus)
            start_janus
            pid=$JANUS_PID
            ;;
    esac
    i=0
    for run in "${RUNS[@]}"; do
        i=$(( i + 1 ))
        p="${run%%:*}"
        s="${run##*:}"
        args=(--publishers "$p" --subscribers "$s" --bitrate-kbps "$BITRATE_KBPS" --fps "$FPS"
              --duration "$DURATION" --warmup "$WARMUP" --threads "$CLIENT_THREADS" --server-pid "$pid")
        if [[ "$target" == vibe ]]; then
            # A fresh room per run (its owner, the token's subject, may join it from every connection).
            room="$(curl -fsS -X POST "$URL/v1/docs/call" -H "authorization: Bearer $TOKEN" \
                -H 'content-type: application/json' -d "{\"data\": {\"title\": \"sfu bench $run\"}}" | jq -r .id)"
            [[ -n "$room" && "$room" != null ]] || { echo "error: could not create the call document" >&2; exit 1; }
            args+=(--url "$URL" --room "$room")
            # Rooms' sockets bound to a specific address other than 127.0.0.1: the peers use it too.
            if [[ -n "${VIBE_CALLS__BIND:-}" && "$VIBE_CALLS__BIND" != 0.0.0.0 ]]; then
                args+=(--bind-ip "$VIBE_CALLS__BIND")
            fi
        else
            # sfu_load creates a fresh videoroom per run.
            args+=(--target janus --janus-url "$JANUS_URL" --bind-ip "$JANUS_MEDIA_IP")
        fi
        json="$RESULTS/sfu-$(printf %02d "$i")-${p}x${s}-${target}.json"
        args+=(--json "$json")
        if [[ "$AUDIO" == 1 ]]; then args+=(--audio); fi
        echo "==> $target run $i: $p publishers × $s subscribers ($(( p * (p + s - 1) )) forwarded video streams): sfu_load ${args[*]}" >&2
        if ! "$SFU_BIN" "${args[@]}" | sed 's/^/    /' >&2; then
            FAILED+=("$target run $i ($run): sfu_load failed")
            continue
        fi
        received="$(jq -r '.frames_received' "$json")"
        forwarded="$(jq -r '.server_forwarded_frames_per_s | floor' "$json")"
        if (( received == 0 || forwarded == 0 )); then
            FAILED+=("$target run $i ($run): nothing forwarded (frames received $received, forwarded/s $forwarded)")
        fi
        # Let the room stop (Janus: its handles be torn down) before the next run.
        sleep 2
    done
    case "$target" in
        vibe) stop_vibe ;;
        janus) stop_pid "$JANUS_PID"; JANUS_PID="" ;;
    esac
done

echo
echo "## SFU forwarding capacity: \`$COMMAND\`"
echo
if [[ -n "$HAS_VIBE" ]]; then
    machine_line
else
    echo "- machine: $(nproc) CPUs, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
fi
if [[ -n "$HAS_JANUS" ]]; then
    echo "- Janus $JANUS_VERSION (videoroom plugin, HTTP transport; configs benches/peers/janus/, RTP ports $JANUS_RTP_PORTS, ICE on $JANUS_MEDIA_IP, $( [[ "$JANUS_EVENT_LOOPS" == 0 ]] && echo 'a thread per handle' || echo "$JANUS_EVENT_LOOPS event loops" )); room bitrate 0 (no REMB), fir_freq 0, VP8"
fi
echo "- one room; video $BITRATE_KBPS kbit/s at $FPS fps per publisher$( [[ "$AUDIO" == 1 ]] && echo ' plus audio' ); client and server on the same machine; CPU in % of one core"
echo
echo "| server | P × S | forwarded video streams | settled after | delivered | per subscriber | server CPU | streams per server core | server µs per forwarded frame | client CPU | SFU added p50 / p99 ms | ≤ 1 ms | subscribers' end to end p50 / p99 ms |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for json in $(for i in "${!RUNS[@]}"; do
                  for target in "${TARGET_LIST[@]}"; do
                      echo "$RESULTS/sfu-$(printf %02d $(( i + 1 )))-${RUNS[$i]/:/x}-$target.json"
                  done
              done); do
    [[ -e "$json" ]] || continue
    jq -r '"| \(.target // "vibe") | \(.publishers) × \(.subscribers) | \(.forwarded_video_streams) | \(if .settled then "\(.settled_s | floor) s" else "not in \(.settled_s | floor) s" end) | \(.delivery * 100 | . * 1000 | round / 1000)% | \(.subscriber_mbps | . * 100 | round / 100) Mbit/s | \(.server_cpu_percent // 0 | round)% | \(.streams_per_server_core // 0 | round) | \(.server_cpu_us_per_forwarded_frame // 0 | . * 10 | round / 10) | \(.client_cpu_percent | round)% | \(if .forward_latency.p50_ms then "\(.forward_latency.p50_ms | . * 1000 | round / 1000) / \(.forward_latency.p99_ms // 0 | . * 1000 | round / 1000)" else "—" end) | \(if .forward_latency.share_le_1ms then "\(.forward_latency.share_le_1ms | . * 1000 | round / 10)%" else "—" end) | \(.end_to_end_ms.subscribers.p50 | . * 100 | round / 100) / \(.end_to_end_ms.subscribers.p99 | . * 100 | round / 100) |"' "$json"
done
if [[ -n "$HAS_VIBE" && -n "$HAS_JANUS" ]]; then
    echo
    echo "| P × S | forwarded video streams | delivered Vibe / Janus | server CPU Vibe / Janus | streams per server core Vibe / Janus | **Vibe ÷ Janus** | subscribers' end to end p50 / p99 ms, Vibe | Janus |"
    echo "|---|---|---|---|---|---|---|---|"
    for i in "${!RUNS[@]}"; do
        vibe_json="$RESULTS/sfu-$(printf %02d $(( i + 1 )))-${RUNS[$i]/:/x}-vibe.json"
        [[ -e "$vibe_json" ]] || continue
        janus_json="${vibe_json%-vibe.json}-janus.json"
        [[ -e "$janus_json" ]] || continue
        jq -rs '.[0] as $v | .[1] as $j
            | def pct: . * 100 | . * 10 | round / 10;
              def ms: . * 100 | round / 100;
            "| \($v.publishers) × \($v.subscribers) | \($v.forwarded_video_streams) | \($v.delivery | pct)% / \($j.delivery | pct)% | \($v.server_cpu_percent // 0 | round)% / \($j.server_cpu_percent // 0 | round)% | \($v.streams_per_server_core // 0 | round) / \($j.streams_per_server_core // 0 | round) | \(if ($j.streams_per_server_core // 0) > 0 then "\(($v.streams_per_server_core // 0) / $j.streams_per_server_core | . * 100 | round / 100)×" else "—" end) | \($v.end_to_end_ms.subscribers.p50 | ms) / \($v.end_to_end_ms.subscribers.p99 | ms) | \($j.end_to_end_ms.subscribers.p50 | ms) / \($j.end_to_end_ms.subscribers.p99 | ms) |"' \
            "$vibe_json" "$janus_json"
    done
fi

if (( ${#FAILED[@]} > 0 )); then
    printf 'error: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
