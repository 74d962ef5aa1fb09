#!/usr/bin/env bash
# chanserv beside its peers, N rounds (default 3) in one session, medians at the end.
#
#   scripts/side-by-side.sh [N]
#
# Needs the peers harness built: (cd ../shared/peers && cargo build --release), or
# PEERS=/path/to/peers. Raw lines go to $RESULTS (default target/side-by-side/), the
# median table to stdout. Each round runs every line once, alternating chanserv and
# the peers, so drift on a noisy machine hits both alike. After the table, the checks of
# issue 13: `flood --rt split` peak RSS against its 64 MiB target, and LZ4 heavy
# (compressible and incompressible) beside plain heavy.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
peers=${PEERS:-../shared/peers/target/release/peers}
out=${RESULTS:-target/side-by-side}
cargo build --release --quiet --example bench
bench=target/release/examples/bench
[ -x "$peers" ] || { echo "no peers binary at $peers (set PEERS)" >&2; exit 2; }
mkdir -p "$out"
rm -f "$out"/round*.txt
for r in $(seq 1 "$rounds"); do
  echo "side-by-side: round $r/$rounds $(date -u +%H:%M:%S)" >&2
  {
    $bench flood;            "$peers" yamux flood;   "$peers" tonic-flat flood;  "$peers" tonic flood
    $bench flood --rt split
    $bench heavy;            "$peers" yamux heavy;   "$peers" tonic heavy;       "$peers" tonic-flat heavy
    $bench connect;          "$peers" yamux connect; "$peers" tonic-flat connect
    $bench connect --rt single; PEERS_RT=single "$peers" tonic-flat connect; PEERS_RT=single "$peers" yamux connect
    $bench heavy --lz4;      $bench heavy --lz4 --random
    $bench flood --sources 100000 --frames 50 | sed 's/workload=flood/workload=flood-100k/'
    $bench mux-heavy;        $bench mux-heavy --sources 1 --frames 5000 | sed 's/workload=mux-heavy/workload=mux-heavy-1/'
    $bench mux-flood
  } | tee "$out/round$r.txt"
done
python3 - "$out"/round*.txt <<'PY'
import statistics, sys
rows, order = {}, []
for path in sys.argv[1:]:
    for line in open(path):
        kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "peer" not in kv or "error" in kv:
            continue
        key = (kv["peer"], kv["workload"], kv["rt"])
        if key not in rows:
            rows[key] = []; order.append(key)
        rows[key].append(kv)
def med(rs, f):
    v = [float(r[f]) for r in rs if f in r]
    return (statistics.median(v), min(v), max(v)) if v else None
print("| peer | workload | rt | runs | frames/s | MiB/s | median µs | p99 µs | RSS MiB | spread |")
print("|---|---|---|---|---|---|---|---|---|---|")
for k in order:
    rs = rows[k]
    fps, mib, us, p99, rss = (med(rs, f) for f in ("frames_per_s", "mib_per_s", "median_us", "p99_us", "rss_mib"))
    spread = f"µs {us[1]:.1f}..{us[2]:.1f}" if us else f"MiB/s {mib[1]:.0f}..{mib[2]:.0f}"
    cell = lambda m, fmt: fmt.format(m[0]) if m else "-"
    print(f"| {k[0]} | {k[1]} | {k[2]} | {len(rs)} | {cell(fps, '{:.3g}')} | {cell(mib, '{:.0f}')} | "
          f"{cell(us, '{:.1f}')} | {cell(p99, '{:.1f}')} | {cell(rss, '{:.1f}')} | {spread} |")
# Issue 13: chanserv's own rows, against a target or beside plain heavy.
cs = lambda w, rt="shared": rows.get(("chanserv", w, rt))
print()
print("| issue 13 check | chanserv | against | ratio / target |")
print("|---|---|---|---|")
split = cs("flood", "split")
if split:
    rss = med(split, "rss_mib")
    verdict = "ok" if rss[0] <= 64 else "OVER"
    print(f"| flood --rt split, peak RSS MiB | {rss[0]:.1f} ({rss[1]:.1f}..{rss[2]:.1f}) | target ≤ 64 | {verdict} |")
heavy = cs("heavy")
for w, what in (("heavy-lz4", "heavy --lz4"), ("heavy-lz4-random", "heavy --lz4 --random")):
    if cs(w) and heavy:
        m, h = med(cs(w), "mib_per_s"), med(heavy, "mib_per_s")
        print(f"| {what}, MiB/s | {m[0]:.0f} ({m[1]:.0f}..{m[2]:.0f}) | plain heavy {h[0]:.0f} | {m[0] / h[0]:.2f}× |")
PY
