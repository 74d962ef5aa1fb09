#!/usr/bin/env bash
# Before/after a change: the chanserv lines of scripts/side-by-side.sh for two builds
# of the bench example, alternating them within each round so a noisy machine's drift
# hits both alike; medians and ratios at the end.
#
#   git worktree add /tmp/before <rev> && (cd /tmp/before && cargo build --release --example bench)
#   cargo build --release --example bench
#   scripts/before-after.sh /tmp/before/target/release/examples/bench target/release/examples/bench [ROUNDS]
set -euo pipefail
B=${1:?before bench binary}
A=${2:?after bench binary}
rounds=${3:-3}
out=${RESULTS:-target/before-after}; rm -rf "$out"; mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  for side in before after; do
    bench=$B; [ $side = after ] && bench=$A
    {
      $bench flood; $bench flood --rt split; $bench heavy; $bench connect; $bench connect --rt single
      $bench heavy --lz4; $bench heavy --lz4 --random
      $bench flood --sources 100000 --frames 50 | sed 's/workload=flood /workload=flood-100k /'
    } | sed "s/^/side=$side /" | tee -a "$out/all.txt"
  done
done
python3 - "$out/all.txt" <<'PY'
import statistics, sys
rows = {}
order = []
for line in open(sys.argv[1]):
    kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
    if "workload" not in kv: continue
    k = (kv["workload"], kv["rt"]); 
    if k not in order: order.append(k)
    rows.setdefault((kv["side"],) + k, []).append(kv)
def med(rs, f):
    v = [float(r[f]) for r in rs if f in r]
    return statistics.median(v) if v else None
print("| workload | rt | before | after | after/before |")
print("|---|---|---|---|---|")
for k in order:
    b, a = rows.get(("before",)+k, []), rows.get(("after",)+k, [])
    for f, unit in (("frames_per_s", "frames/s"), ("mib_per_s", "MiB/s"), ("median_us", "median µs"), ("rss_mib", "RSS MiB")):
        mb, ma = med(b, f), med(a, f)
        if mb is None or ma is None: continue
        if f == "frames_per_s" and "mib_per_s" in b[0] and k[0].startswith("heavy"): continue
        print(f"| {k[0]} | {k[1]} | {mb:.4g} {unit} | {ma:.4g} {unit} | {ma/mb:.2f} |")
PY
