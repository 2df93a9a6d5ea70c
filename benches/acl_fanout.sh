#!/usr/bin/env bash
# Do ACLs cost the fan-out? The broadcast scenario of benches/fanout.rs against one Vibe, once
# with public documents and once with mixed ACLs (in turn: public; a DID allow and deny list;
# certificate predicates in allow and deny, which the subscriber's certificate book is asked
# about on every delivery), alternating ROUNDS times, in the same run on the same server. Prints
# delivered events/s, latency, server CPU and server CPU time per delivered event of each, and
# the mixed/public ratios of the means. Choose a RATE both sustain (latency flat, nothing
# missing): past the knee, delivered/s measures the backlog, not the cost; the capacity ratio is
# then public CPU per event / mixed CPU per event.
#
#   CONNECTIONS=10000 PROCESSES=2 SOURCE_ADDRS=4 RATE=100 DURATION=15 ROUNDS=2 benches/acl_fanout.sh
#   SMOKE=1 benches/acl_fanout.sh      # tiny numbers, one round; non-zero exit on missing events
#
# Needs what benches/fanout.sh needs (cargo, psql, curl, jq, python3, a trust PostgreSQL at
# 127.0.0.1:5432). Creates a throwaway database and removes everything on exit.
#
# Env knobs: CONNECTIONS (1000), RATE (writes/s, 100), DURATION (measured s, 10), WARMUP (2),
# DRAIN (5), SOURCE_ADDRS (1), PROCESSES (1), ROUNDS (2), SMOKE (0), RESULTS_DIR (default: a
# temporary folder removed on exit), CARGO_TARGET_DIR (./target).

set -euo pipefail
shopt -s inherit_errexit
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SMOKE="${SMOKE:-0}"
CONNECTIONS="${CONNECTIONS:-1000}"
RATE="${RATE:-100}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
DRAIN="${DRAIN:-5}"
SOURCE_ADDRS="${SOURCE_ADDRS:-1}"
PROCESSES="${PROCESSES:-1}"
ROUNDS="${ROUNDS:-2}"
RESULTS_DIR="${RESULTS_DIR:-}"
if [[ "$SMOKE" == 1 ]]; then
    CONNECTIONS=20 RATE=20 DURATION=2 WARMUP=1 DRAIN=3 ROUNDS=1 PROCESSES=1 SOURCE_ADDRS=1
fi
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "error: ROUNDS must be a positive number (got '$ROUNDS')" >&2; exit 2; }
SUBJECT=did:key:zBench
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
COMMAND="CONNECTIONS=$CONNECTIONS PROCESSES=$PROCESSES SOURCE_ADDRS=$SOURCE_ADDRS RATE=$RATE DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS benches/acl_fanout.sh"

require_tools cargo psql curl jq python3
build_release
FANOUT_BIN="$(require_bench_bin fanout)"
create_bench_db vibe-aclfanout
RESULTS="${RESULTS_DIR:-$WORK}"
mkdir -p "$RESULTS"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
start_vibe vibe.log
# The documents belong to another identity than the subscribers': the owner may always read its
# own documents, so with one identity for both no ACL would ever be evaluated. (Minted before
# any VIBE_BENCH_* is exported: `vibe` takes VIBE_* variables for its configuration.)
WRITER_SUBJECT="did:key:zBenchWriter"
WRITER_TOKEN="$("$VIBE_BIN" token mint --sub "$WRITER_SUBJECT" --scope '*' --ttl 24h | tail -n 1)"
[[ -n "$WRITER_TOKEN" ]] || { echo "error: token mint printed nothing" >&2; exit 1; }
mint_token
export VIBE_BENCH_TOKEN="$TOKEN" VIBE_BENCH_WRITER_TOKEN="$WRITER_TOKEN"

# The subscriber holds `member-of` from did:key:zIssuer: stored as the server stores certificates
# (the realtime tree reads it from the change feed like any write), so the predicates of the
# mixed ACLs are evaluated against a non-empty book.
psql_bench -c "INSERT INTO documents (id, owner_did, type, acl, data) VALUES (gen_random_uuid(), 'did:key:zIssuer', 'vibe.certificate', '{\"read\": {\"allow\": [\"$SUBJECT\"]}}', '{\"subject\": \"$SUBJECT\", \"type\": \"member-of\"}')"

FAILED=()
for round in $(seq 1 "$ROUNDS"); do
    for acl in public mixed; do
        json="$RESULTS/broadcast-$acl-$round.json"
        args=(--url "$URL" --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP"
              --drain "$DRAIN" --source-addrs "$SOURCE_ADDRS" --server-pid "$SERVER_PID" --json "$json"
              --rate "$RATE" --acl "$acl")
        if (( PROCESSES > 1 )); then args+=(--processes "$PROCESSES"); fi
        echo "==> round $round, $acl ACLs: fanout broadcast ${args[*]}" >&2
        "$FANOUT_BIN" broadcast "${args[@]}" | sed 's/^/    /' >&2
        errors="$(jq -r '.errors' "$json")"
        missing="$(jq -r '.events_missing' "$json")"
        if (( errors > 0 || missing > 0 )); then
            FAILED+=("round $round, $acl: $errors errors, $missing missing events; first error: $(jq -r '.first_error // "none"' "$json")")
        fi
    done
done

echo
echo "## ACL cost of fan-out: \`$COMMAND\`"
echo
machine_line
echo "- $CONNECTIONS subscribers ($SUBJECT) of one global live query, $RATE writes/s by $WRITER_SUBJECT (so every delivery consults the subscriber's read access); client and server on the same machine"
echo
echo "| round | ACLs | delivered events/s | missing | p50 ms | p99 ms | p99.9 ms | server CPU % | server CPU µs per event |"
echo "|---|---|---|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    for acl in public mixed; do
        jq -r --arg r "$round" '"| \($r) | \(.acl) | \(.events_per_sec | floor) | \(.events_missing) | \(.latency_ms.p50) | \(.latency_ms.p99) | \(.latency_ms.p99_9) | \(.cpu.server_cpu_percent // 0 | floor) | \((.cpu.server_cpu_percent // 0) * 10000 / .events_per_sec | . * 100 | round / 100) |"' \
            "$RESULTS/broadcast-$acl-$round.json"
    done
done
mean() { jq -s "[.[].$2] | add / length" "$RESULTS"/broadcast-"$1"-*.json; }
public_rate="$(mean public events_per_sec)"
mixed_rate="$(mean mixed events_per_sec)"
public_cost="$(jq -s '[.[] | (.cpu.server_cpu_percent // 0) * 10000 / .events_per_sec] | add / length' "$RESULTS"/broadcast-public-*.json)"
mixed_cost="$(jq -s '[.[] | (.cpu.server_cpu_percent // 0) * 10000 / .events_per_sec] | add / length' "$RESULTS"/broadcast-mixed-*.json)"
echo
python3 -c "print(f'- mixed / public delivered events/s: {$mixed_rate / $public_rate:.3f}; capacity (public / mixed server CPU per event): {$public_cost / $mixed_cost:.3f} (means over $ROUNDS rounds)')"

if (( ${#FAILED[@]} > 0 )); then
    printf 'error: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
