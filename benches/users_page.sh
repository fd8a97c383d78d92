#!/usr/bin/env bash
# The Users page under load (issue: p99 under 50 ms with 1,000,000 users while a
# 100,000-row job is being applied). Builds a tenant of 1,000,000 users, starts
# `rollcall serve`, queues back-to-back 100,000-row jobs (deactivate, reactivate, ...) so the
# job worker is applying one for the whole measurement, and runs wrk against loopback with
# benches/users_page.lua. Prints wrk's latency distribution and the jobs that ran.
#
# Usage: benches/users_page.sh [SECONDS] [CONNECTIONS]   (default 20 s, 4 connections)
# Needs: cargo build --release, wrk (apt-get install wrk), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/rollcall}
DUR=${1:-20}
CONN=${2:-4}
W=$(mktemp -d)
SERVER=
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
D=$W/data
python3 - "$W" <<'PY'
import sys
w = sys.argv[1]
head = "Email,First Name,Last Name,Job Title,Team,Role,Language,Licence Pool\n"
with open(f"{w}/users.csv", "w") as f:
    f.write(head)
    for i in range(1_000_000):
        f.write(f"u{i}@example.com,Ann{i % 997},Lee{i % 4999},Engineer,,Learner,,Standard\n")
for op, head, tail in (("deactivate", "Email,Reason", "bench"), ("reactivate", "Email,Licence Pool", "")):
    with open(f"{w}/{op}.csv", "w") as f:
        f.write(head + "\n")
        for i in range(0, 1_000_000, 10):
            f.write(f"u{i}@example.com,{tail}\n")
PY
$BIN --data-dir "$D" tenant create Bench >/dev/null
$BIN --data-dir "$D" pool set --tenant Bench Standard 2000000 >/dev/null
start=$(date +%s.%N)
$BIN --data-dir "$D" import --tenant Bench --op add "$W/users.csv" >/dev/null
echo "Imported 1,000,000 users in $(echo "$(date +%s.%N) - $start" | bc) s"
TOKEN=$($BIN --data-dir "$D" token create bench --role operator | tail -n 1)
$BIN --data-dir "$D" serve --listen 127.0.0.1:0 >"$W/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do grep -q "listening on" "$W/serve.log" && break; sleep 0.1; done
ADDR=$(grep -o 'http://[0-9.:]*' "$W/serve.log" | head -n 1)
# Jobs of 100,000 rows each, queued back to back: one is always being applied.
for _ in $(seq 6); do
  $BIN --data-dir "$D" import --tenant Bench --op deactivate --no-wait --yes "$W/deactivate.csv" >/dev/null
  $BIN --data-dir "$D" import --tenant Bench --op reactivate --no-wait --yes "$W/reactivate.csv" >/dev/null
done
sleep 1
echo "wrk: $CONN connections, ${DUR} s, against $ADDR while the jobs run"
# Any answer but 200 is an error of the benchmark itself (wrk counts them as non-2xx).
wrk -t1 -c"$CONN" -d"${DUR}s" --latency -s benches/users_page.lua -H "Authorization: Bearer $TOKEN" "$ADDR"
echo "Jobs (the measurement ran while these were applied):"
$BIN --data-dir "$D" jobs list --limit 14
