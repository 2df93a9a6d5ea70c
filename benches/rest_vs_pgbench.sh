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
#   child:  Vibe POST /v1/docs/benchdocs with "parent" (one parent owned by another DID, whose ACL
#           `create` rule admits the bench's subject) vs pgbench doing the same in a transaction:
#           the parent's owner and ACL read FOR SHARE, then the INSERT
# The read runs share READ_ROWS documents that a short REST run creates with deterministic ids
# before any read is measured (then ANALYZE): document n is 00000000-0000-4000-8000-<n as 12
# zero-padded digits>.
# pgbench runs in both -M simple and -M prepared (Vibe's sqlx uses prepared statements).
# Everything is loopback-only; the database, server and data dir are removed on exit.
#
# Env knobs: DURATION (seconds per run, default 10), WARMUP (seconds of unmeasured load before
# each REST run, default 2), CONCURRENCY (space-separated list, default "8"), OPS (which of
# "create read child" to run, default "create read"), PARENT_OWNER (the child runs' parent is
# another DID's by default, whose rule the server checks under a lock; `self`: the subject's own,
# which needs no rule),
# ROUNDS (how many times each operation's three runs repeat, one after the other, default 1:
# this machine's rates drift by a third over minutes, so a ratio of runs made side by side and
# the median over rounds say more than one long run), CARGO_TARGET_DIR (where the release build
# goes, default ./target).

set -euo pipefail
shopt -s inherit_errexit
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-1}"
WARMUP="${WARMUP:-2}"
CONCURRENCY="${CONCURRENCY:-8}"
OPS="${OPS:-create read}"
DOC_TYPE=benchdocs
SUBJECT=did:key:zBench
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres
READ_ROWS=1000

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

require_tools cargo psql pgbench curl jq python3

# --- build -------------------------------------------------------------------------------------

build_release
LOAD_BIN="$(require_bench_bin http_load)"

# --- database, server, token -------------------------------------------------------------------

create_bench_db vibe-bench
start_vibe server.log "vibe serve"
mint_token

# --- pgbench scripts ---------------------------------------------------------------------------

# The create statement (see insert_sql in lib.sh for how it keeps pgbench off its colons).
insert_sql "$DOC_TYPE" >"$WORK/create.sql"

# pgbench variables cannot hold a uuid, so the script draws a document number n and builds its id
# the way http_load does (read_id_sql): one primary-key lookup per transaction, like Vibe's GET.
# The column list and the type filter are the ones Vibe's GET uses.
READ_ID_PREFIX=00000000-0000-4000-8000-
read_id_sql() { echo "('$READ_ID_PREFIX' || lpad($1::text, 12, '0'))::uuid"; }
cat >"$WORK/read.sql" <<SQL
\set n random(1, $READ_ROWS)
SELECT id, owner_did, type, parent, created_at, updated_at, rev, acl, data FROM documents WHERE id = $(read_id_sql :n) AND type = '$DOC_TYPE';
SQL

# The parent of the `child` runs: another DID's document whose `create` rule admits SUBJECT. The
# pgbench side does what an application on the database would: lock the parent's row, check its
# rule (here: read it), insert.
PARENT_ID=00000000-0000-4000-8000-ffffffffffff
PARENT_SQL="SELECT owner_did, acl FROM documents WHERE id = '$PARENT_ID' FOR SHARE;"
{
    echo "BEGIN;"
    echo "$PARENT_SQL"
    insert_sql "$DOC_TYPE" | sed "s/INSERT INTO documents (id, owner_did, type, acl, data) VALUES (gen_random_uuid(), /INSERT INTO documents (id, parent, owner_did, type, acl, data) VALUES (gen_random_uuid(), '$PARENT_ID', /"
    echo "COMMIT;"
} >"$WORK/child.sql"
grep -q "parent, owner_did" "$WORK/child.sql" || { echo "error: the child insert was not built" >&2; exit 1; }

# --- runs --------------------------------------------------------------------------------------

# rest MODE C [HTTP_LOAD_ARG...] -> prints "rps p50_us p99_us errors"
rest() {
    local mode=$1 c=$2 out="$WORK/rest_${1}_${2}_$#.json"
    shift 2
    echo "==> Vibe REST $mode $*, concurrency $c, ${WARMUP}s warmup + ${DURATION}s" >&2
    psql_bench -c 'CHECKPOINT'
    "$LOAD_BIN" --url "$URL" --token "$TOKEN" --mode "$mode" --type "$DOC_TYPE" \
        --concurrency "$c" --duration "$DURATION" --warmup "$WARMUP" --read-docs "$READ_ROWS" \
        --json "$out" "$@" | sed 's/^/    /' >&2
    jq -r '"\(.requests_per_sec) \(.latency_us.p50) \(.latency_us.p99) \(.errors)"' "$out"
}

# pg SCRIPT C PROTOCOL -> prints "tps failed"
pg() {
    local script=$1 c=$2 protocol=$3 jobs=2 out
    (( c < jobs )) && jobs=$c
    echo "==> pgbench $(basename "$script" .sql), -M $protocol, -c $c -j $jobs -T $DURATION" >&2
    psql_bench -c 'CHECKPOINT'
    out="$(pgbench -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -n -c "$c" -j "$jobs" -T "$DURATION" \
        -M "$protocol" -f "$script" "$DB" 2>&1)" || { echo "$out" >&2; echo "error: pgbench failed" >&2; exit 1; }
    pgbench_summary "$out"
    echo "${PGBENCH_TPS:-0} ${PGBENCH_FAILED:-0}"
}

ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
int() { awk -v x="$1" 'BEGIN { printf "%.0f", x }'; }

ROWS=()
NOTES=()
RATIOS=()
row() { # op c rest_line simple_line prepared_line
    local op=$1 c=$2 rps p50 p99 errors tps_s fail_s tps_p fail_p
    read -r rps p50 p99 errors <<<"$3"
    read -r tps_s fail_s <<<"$4"
    read -r tps_p fail_p <<<"$5"
    RATIOS+=("$(ratio "$rps" "$tps_p")")
    ROWS+=("| $op | $c | $(int "$rps") | $(int "$tps_s") | $(int "$tps_p") | ${RATIOS[-1]} | $(ms "$p50") / $(ms "$p99") ms |")
    (( errors > 0 )) && NOTES+=("- $op at concurrency $c: $errors REST requests failed (see the run output above).")
    (( fail_s + fail_p > 0 )) && NOTES+=("- $op at concurrency $c: pgbench reported $fail_s (simple) / $fail_p (prepared) failed transactions.")
    return 0
}

# After ROUNDS > 1 rows of one operation: a row with the median of their ratios.
median_row() { # op c
    (( ROUNDS > 1 )) || return 0
    local median
    median="$(printf '%s\n' "${RATIOS[@]}" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }')"
    ROWS+=("| $1 | $2 | median of $ROUNDS rounds | | | **$median** | |")
}

# measure OP C MODE [HTTP_LOAD_ARG...]: ROUNDS rounds of the REST run (http_load --mode MODE) and
# pgbench's simple and prepared runs of $WORK/OP.sql, a row each, then the median row.
measure() {
    local op=$1 c=$2 mode=$3 rest_line simple_line prepared_line round
    shift 3
    RATIOS=()
    for ((round = 1; round <= ROUNDS; round++)); do
        rest_line="$(rest "$mode" "$c" "$@")"
        simple_line="$(pg "$WORK/$op.sql" "$c" simple)"
        prepared_line="$(pg "$WORK/$op.sql" "$c" prepared)"
        row "$op" "$c" "$rest_line" "$simple_line" "$prepared_line"
    done
    median_row "$op" "$c"
}

if [[ " $OPS " == *" child "* ]]; then
    pg_subject="$(sed 's/:/\\x3a/g' <<<"$SUBJECT")"
    parent_owner="'did:key:zParentOwner'"
    [[ "${PARENT_OWNER:-}" == self ]] && parent_owner="E'$pg_subject'"
    psql_bench -c "INSERT INTO documents (id, owner_did, type, acl, data) VALUES ('$PARENT_ID',
        $parent_owner, 'benchrooms', jsonb_build_object('create',
        jsonb_build_object('allow', jsonb_build_array(E'$pg_subject'))), '{}')"
fi

READ_ROWS_READY=""
for c in $CONCURRENCY; do
    [[ " $OPS " == *" create "* ]] && measure create "$c" create
    [[ " $OPS " == *" child "* ]] && measure child "$c" create --parent "$PARENT_ID"
    [[ " $OPS " == *" read "* ]] || continue

    # A REST read run first creates (or finds) documents 1..READ_ROWS. The first one is a short
    # unmeasured run that only does that, so that the table's statistics are current (ANALYZE)
    # before either side is measured: plans made without them can scan the whole table.
    if [[ -z "$READ_ROWS_READY" ]]; then
        echo "==> seeding the $READ_ROWS read documents through the REST API" >&2
        "$LOAD_BIN" --url "$URL" --token "$TOKEN" --mode read --type "$DOC_TYPE" \
            --concurrency 1 --duration 0.1 --warmup 0 --read-docs "$READ_ROWS" >/dev/null
        have="$(psql_bench -At -c "SELECT count(*) FROM documents WHERE type = '$DOC_TYPE' AND id IN (
            SELECT $(read_id_sql n) FROM generate_series(1, $READ_ROWS) AS n)")"
        [[ "$have" == "$READ_ROWS" ]] || { echo "error: $have of the $READ_ROWS read documents exist" >&2; exit 1; }
        psql_bench -c 'ANALYZE documents'
        READ_ROWS_READY=1
    fi
    measure read "$c" read
done

# --- report ------------------------------------------------------------------------------------

MACHINE="$(machine_line)"
DOCS="$(psql_bench -At -c "SELECT count(*) || ' (owners: ' || string_agg(DISTINCT owner_did, ', ') || '; types: ' || string_agg(DISTINCT type, ', ') || ')' FROM documents")"

cat <<EOF

## Vibe REST vs pgbench

$MACHINE
- Vibe: $("$VIBE_BIN" --version), release build; load client, server and PostgreSQL share this machine
- each run: \`CHECKPOINT\` first (a checkpoint landing inside one run and not another was the
  largest source of run-to-run spread), then ${DURATION}s measured (REST runs add ${WARMUP}s of
  unmeasured warmup; pgbench runs have none)
- rounds: $ROUNDS (an operation's REST, simple and prepared runs, repeated in turn; with more than
  one, a last row gives the median of their ratios)
- REST: one keep-alive HTTP/1.1 connection per concurrent client; req/s counts 2xx answers only
- pgbench: \`-n -c C -j min(2,C) -T $DURATION\`, one statement per transaction (autocommit)
- create: REST \`POST /v1/docs/$DOC_TYPE\` vs pgbench \`INSERT INTO documents (id, owner_did, type, acl, data) VALUES (gen_random_uuid(), ...)\`
- child: REST \`POST /v1/docs/$DOC_TYPE\` with \`"parent"\` (one parent, another DID's, whose \`create\`
  rule lists the subject) vs pgbench \`BEGIN; $PARENT_SQL INSERT ... (parent = it); COMMIT\`
- read: both pick n uniformly in 1..$READ_ROWS and fetch the document with the deterministic id
  \`$READ_ID_PREFIX\` + n as 12 zero-padded digits (seeded through the REST API and analyzed before
  any read run):
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
