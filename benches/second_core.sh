#!/usr/bin/env bash
# What a busy second core costs the writer on this machine.
#
# The `apply` bench stage (rows from the generator through every check, the writes and the
# before/after records, one transaction) runs confined to CPU 1, in rounds: once with CPU 0
# idle, once with a busy loop on CPU 0. Nothing of the stage runs on CPU 0 in either run, so
# a difference is what the other core's load costs this one (shared caches or execution
# units, clock speed, the host): the price an import's pipeline pays for reading the file on
# the second core while the writer writes. Prints the medians and the median of each
# round's own ratio (busy / idle).
#
#     cargo build --release
#     benches/second_core.sh [ROWS] [ROUNDS]        # default 10000 rows, 8 rounds
#
# Needs two CPUs, taskset (util-linux) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-10000}
rounds=${2:-8}
bin=target/release/rollcall
[ -x "$bin" ] || cargo build --release
if [ "$(nproc)" -lt 2 ]; then
  echo "second_core.sh needs two CPUs; this machine has $(nproc)" >&2
  exit 2
fi
work=$(mktemp -d)
busy=""
cleanup() {
  [ -n "$busy" ] && kill "$busy" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

stage() {
  rm -rf "$work/data"
  taskset -c 1 "$bin" __bench-stage \
    "{\"stage\":\"apply\",\"file\":\"-\",\"data_dir\":\"$work/data\",\"rows\":$rows}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["secs"])'
}

for i in $(seq "$rounds"); do
  idle=$(stage)
  taskset -c 0 sh -c 'while :; do :; done' &
  busy=$!
  loaded=$(stage)
  kill "$busy"
  wait "$busy" 2>/dev/null || true
  busy=""
  echo "$idle $loaded"
done | python3 -c '
import statistics, sys
pairs = [tuple(map(float, line.split())) for line in sys.stdin]
idle = statistics.median(a for a, _ in pairs)
busy = statistics.median(b for _, b in pairs)
ratio = statistics.median(b / a for a, b in pairs)
print(f"apply, {sys.argv[1]} rows, on CPU 1: CPU 0 idle {idle:.3f} s, CPU 0 busy {busy:.3f} s; "
      f"busy / idle per round: median {ratio:.3f} ({len(pairs)} rounds)")
' "$rows"
