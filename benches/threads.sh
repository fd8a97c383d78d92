#!/usr/bin/env bash
# Where one bench stage's time goes, thread by thread: a CPU timeline.
#
# Runs one `__bench-stage` (see docs/BENCHMARKS.md) under `perf record` and prints, for
# every 10 ms of the run, how much of a CPU each busy thread used (100 = one whole core),
# then each thread's total. It shows what the wall time of a stage is made of: which
# thread the others wait for, when a core is idle, whether the threads of a pipeline
# overlap. Threads are named by process and thread: `parent/main` is the process the
# stage runs in (the writer, for apply and import), `parent/check` the checking thread,
# `worker/main` and `worker/inflate` the file's worker (found by its inflating thread, so a
# worker on a CSV file or small parts shows by PID, as the rules worker does), unnamed
# threads by their thread ID. Samples are counted at 4000 Hz, so the figures are
# approximate (perf may lower the rate on a busy machine).
#
#     cargo build --release
#     benches/threads.sh import 10000                # stage, rows [, file]
#     benches/threads.sh validate_rowrule 100000
#
# The file defaults to the one `rollcall bench` generated (`$TMPDIR/rollcall-bench`,
# add12-ROWS.xlsx). The release binary is built first if it is out of date. The stage's own
# set-up (a fresh database) is in the timeline too, before the timed part. Needs perf
# (Debian: linux-perf; kernel.perf_event_paranoid <= 2 or root) and python3.
set -euo pipefail
stage=${1:-import}
rows=${2:-10000}
file=${3:-${TMPDIR:-/tmp}/rollcall-bench/add12-$rows.xlsx}
case "$rows" in
  '' | *[!0-9]*)
    echo "ROWS must be a number, not '$rows'" >&2
    exit 2
    ;;
esac
if [ ! -f "$file" ]; then
  echo "no file $file: run \`rollcall bench --rows $rows\` once, or name a file" >&2
  exit 2
fi
file=$(realpath "$file")
cd "$(dirname "$0")/.."
if ! command -v perf >/dev/null; then
  echo "threads.sh needs perf (Debian: apt-get install linux-perf)" >&2
  exit 2
fi
cargo build --release --quiet
bin=target/release/rollcall
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
args=$(python3 -c 'import json, sys; print(json.dumps({"stage": sys.argv[1], "file": sys.argv[2], "data_dir": sys.argv[3], "rows": int(sys.argv[4])}))' \
  "$stage" "$file" "$work/data" "$rows")
hz=4000
perf record -q -F "$hz" -o "$work/perf.data" -- "$bin" __bench-stage "$args" \
  >"$work/result.json" 2>"$work/perf.log" || {
  cat "$work/perf.log" >&2
  exit 1
}
perf script -i "$work/perf.data" -F pid,tid,comm,time 2>"$work/script.log" |
  python3 -c '
import collections, json, sys
hz, bucket = float(sys.argv[1]), 0.010
result = json.load(open(sys.argv[2]))
samples = []
for line in sys.stdin:
    # "comm pid/tid time:" where comm may hold spaces
    parts = line.split()
    if len(parts) < 3:
        continue
    t = float(parts[-1].rstrip(":"))
    pid, tid = parts[-2].split("/")
    comm = " ".join(parts[:-2])
    samples.append((t, int(pid), int(tid), comm))
if not samples:
    sys.exit("perf recorded no samples")
first_pid = min(samples)[1]
# the file worker is the process with an "inflate" thread
workers = {pid for _, pid, _, comm in samples if comm == "inflate"}
def label(pid, tid, comm):
    if pid == first_pid:
        proc = "parent"
    else:
        proc = "worker" if pid in workers else f"pid{pid}"
    name = "main" if pid == tid else (comm if comm != "rollcall" else f"t{tid}")
    return f"{proc}/{name}"
t0 = samples[0][0]
per = collections.defaultdict(collections.Counter)
total = collections.Counter()
for t, pid, tid, comm in samples:
    name = label(pid, tid, comm)
    per[int((t - t0) / bucket)][name] += 1
    total[name] += 1
names = [n for n, c in total.most_common() if c / hz >= 0.002]
per_bucket = hz * bucket
stage, rows, secs = result.get("stage"), result.get("rows"), result.get("secs", 0)
print(f"stage {stage}: {rows} rows, {secs:.3f} s timed (the set-up before it is in the "
      "timeline too); % of one core per 10 ms")
width = max(16, max(len(n) for n in names) + 2)
print("   ms " + "".join(f"{n:>{width}}" for n in names))
for b in range(min(per), max(per) + 1):
    row = per.get(b, {})
    print(f"{b * 10:5d} " + "".join(f"{100 * row.get(n, 0) / per_bucket:{width}.0f}" for n in names))
print("CPU s " + "".join(f"{total[n] / hz:{width}.3f}" for n in names))
' "$hz" "$work/result.json" || {
  cat "$work/script.log" >&2
  exit 1
}
