#!/usr/bin/env bash
# One source over a link with a 20 ms round trip, beside raw TCP on the same path
# (issue 13, "WAN"): is chanserv capped by a fixed window?
#
#   sudo scripts/wan.sh                          # about 2 minutes; root and iproute2
#   WAN_ROUNDS=5 WAN_BYTES=$((1<<30)) sudo scripts/wan.sh
#   WAN_WINDOW=$((64<<20)) sudo scripts/wan.sh   # the chanserv client's window and budget
#
# Two network namespaces joined by a veth pair: the server (examples/wan.rs) in A, the
# client in B. This kernel has no netem, so the delay is examples/delayproxy.rs, in B
# on the path from client to server: every byte waits WAN_DELAY_MS (10) in each
# direction, a 20 ms round trip, with no cap on throughput. Paths measured:
#   delay  client -> proxy (10 ms each way) -> veth -> server
#   proxy0 client -> proxy (no delay)       -> veth -> server   (the proxy's own cost)
#   direct client -> veth -> server
# On each: raw TCP (N bytes on one connection) and one chanserv source of N bytes in
# frames of 1 MiB and of 64 KiB, each a fresh client process, WAN_ROUNDS rounds
# (default 3) interleaved; medians and the ratio chanserv/raw at the end. Raw lines go
# to $RESULTS (default target/wan/).
#
# Read the raw row on a delayed path as the path's ceiling: the proxy ends TCP on each
# side, so plain TCP never sees the delay in its own windows (see delayproxy.rs);
# chanserv's windows (yamux's, chanserv's credits) do, as their updates cross the proxy.
#
# Nothing leaves the machine (10.78.0.0/24 exists only inside the namespaces), and the
# namespaces and processes are removed on any exit. The whole run is bounded by
# WAN_TIMEOUT (600 s).
set -euo pipefail

cd "$(dirname "$0")/.."
. scripts/netns.sh # netns_teardown, netns_report
[[ $EUID -eq 0 ]] || { echo "wan.sh: run as root (network namespaces)" >&2; exit 2; }
if [[ -z ${WAN_INNER:-} ]]; then
    cargo build --release --quiet --example wan --example delayproxy
    WAN_INNER=1 exec timeout -k 20 "${WAN_TIMEOUT:-600}" "$0" "$@"
fi

BIN=$PWD/target/release/examples
ROUNDS=${WAN_ROUNDS:-3}
BYTES=${WAN_BYTES:-$((512 << 20))}
DELAY_MS=${WAN_DELAY_MS:-10}
FRAMES=(1048576 65536)
OUT=${RESULTS:-$PWD/target/wan}
P=chwan$$ # prefix of the namespaces this run makes
A=$P-a B=$P-b
IP_A=10.78.0.1 IP_B=10.78.0.2
NETNS=() PIDS=()
LOG=$(mktemp -d /tmp/chanserv-wan.XXXXXX)

exec 3>&2 # the cleanup's report, once stderr is silenced
cleanup() {
    set +e
    exec 2>/dev/null # no job-control notices for the processes killed here
    netns_teardown "${PIDS[@]}"
    rm -rf "$LOG"
    netns_report "$P" >&3
}
trap cleanup EXIT
trap 'echo "wan.sh: interrupted (timeout?)" >&2; exit 124' INT TERM

# ------------------------------------------------------------------ the world
for ns in "$A" "$B"; do ip netns add "$ns" && NETNS+=("$ns"); ip -n "$ns" link set lo up; done
ip -n "$A" link add eth0 type veth peer name eth0 netns "$B"
ip -n "$A" addr add $IP_A/24 dev eth0 && ip -n "$A" link set eth0 up
ip -n "$B" addr add $IP_B/24 dev eth0 && ip -n "$B" link set eth0 up

# start NS NAME CMD...: runs CMD in NS, waits for its first "ready" line on stdout.
start() {
    local ns=$1 name=$2
    shift 2
    ip netns exec "$ns" "$@" >"$LOG/$name.out" 2>"$LOG/$name.err" &
    PIDS+=($!)
    for _ in $(seq 100); do
        grep -q '^ready' "$LOG/$name.out" && return 0
        sleep 0.1
    done
    echo "wan.sh: $name did not start:" >&2
    cat "$LOG/$name.err" >&2
    exit 1
}
start "$A" server "$BIN/wan" serve --listen $IP_A:7000 --raw-listen $IP_A:7001
start "$B" proxy-cs "$BIN/delayproxy" --listen 127.0.0.1:7100 --to $IP_A:7000 --delay-ms "$DELAY_MS"
start "$B" proxy-raw "$BIN/delayproxy" --listen 127.0.0.1:7101 --to $IP_A:7001 --delay-ms "$DELAY_MS"
start "$B" proxy0-cs "$BIN/delayproxy" --listen 127.0.0.1:7200 --to $IP_A:7000 --delay-ms 0
start "$B" proxy0-raw "$BIN/delayproxy" --listen 127.0.0.1:7201 --to $IP_A:7001 --delay-ms 0
# path name -> "chanserv address, raw address"
declare -A PATHS=([delay]="127.0.0.1:7100 127.0.0.1:7101" [proxy0]="127.0.0.1:7200 127.0.0.1:7201"
    [direct]="$IP_A:7000 $IP_A:7001")
ORDER=(delay proxy0 direct)
declare -A CONFIGURED=([delay]="$((2 * DELAY_MS)) ms" [proxy0]="0 ms" [direct]="0 ms")

client() { ip netns exec "$B" timeout 120 "$BIN/wan" "$@"; }

mkdir -p "$OUT"
rm -f "$OUT"/round*.txt "$OUT"/rtt.txt
echo "wan: server in $A ($IP_A), client and proxies in $B; $((BYTES >> 20)) MiB per run, $ROUNDS rounds" >&2
for path in "${ORDER[@]}"; do
    read -r _ raw <<<"${PATHS[$path]}"
    client rtt --connect "$raw" --count 20 | sed -n "s/^wan /path=$path /p" >>"$OUT/rtt.txt"
done
for r in $(seq 1 "$ROUNDS"); do
    echo "wan: round $r/$ROUNDS $(date -u +%H:%M:%S)" >&2
    for path in "${ORDER[@]}"; do
        read -r cs raw <<<"${PATHS[$path]}"
        {
            client client --connect "$raw" --raw --bytes "$BYTES" || true
            for f in "${FRAMES[@]}"; do
                client client --connect "$cs" --bytes "$BYTES" --frame "$f" ${WAN_WINDOW:+--window "$WAN_WINDOW"} || true
            done
        } | sed -n "s/^wan /path=$path round=$r /p" | tee -a "$OUT/round$r.txt" >&2
    done
done

# One more run on the delayed path with yamux's debug log: its round-trip estimate and
# the largest stream window its auto-tuning reached (in yamux 0.13 a stream's window
# starts at 256 KiB and doubles while the sender uses half of it within 2 RTTs).
RUST_LOG=yamux=debug,chanserv=debug ip netns exec "$B" timeout 120 "$BIN/wan" client --connect "${PATHS[delay]%% *}" \
    --bytes "$BYTES" --frame "${FRAMES[0]}" 2>"$LOG/yamux.log" >/dev/null || true
cp "$LOG/yamux.log" "$OUT/window.log"
CREDIT=$(awk '/source window grew/ { for (i = 1; i <= NF; i++) if ($i ~ /^window=/) { split($i, kv, "="); if (kv[2] + 0 > w) w = kv[2] + 0 } }
    END { printf "chanserv on the delayed path: largest source window %.2f MiB\n", w / 1048576 }' "$LOG/yamux.log")
YAMUX=$(awk '/estimated round-trip-time/ { rtt = $NF } /new window_max/ { v = $(NF - 1) + 0; if (v > w) w = v }
    END { printf "yamux on the delayed path: RTT estimate %s, largest stream window %s MiB\n",
        rtt ? rtt : "none", w ? w : "0.25 (never grown)" }' "$LOG/yamux.log")
# The delaying proxies' own account of the server-to-client direction: how late chunks
# went out beyond the delay, and the most bytes queued (at the 64 MiB cap, the client
# read slower than the server sent).
proxy_summary() {
    awk -v name="$1" '$3 == "to_client" { for (i = 4; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] + 0 }
        n++; late += v["late_mean_ms"]; if (v["late_max_ms"] > lmax) lmax = v["late_max_ms"]
        if (v["queued_max_mib"] > q) q = v["queued_max_mib"] }
        END { printf "delay proxy, %s: %d connections, chunks late beyond the delay by %.2f ms on average (max %.1f), most queued %.1f MiB\n",
            name, n, n ? late / n : 0, lmax, q }' "$LOG/$2.err"
}
sleep 1 # the proxy prints a connection's account once both directions closed
PROXY="$(proxy_summary chanserv proxy-cs)
$(proxy_summary "raw TCP" proxy-raw)"

# ------------------------------------------------------------------ the table
python3 - "$OUT/rtt.txt" "${ORDER[*]}" "${CONFIGURED[delay]}" "$OUT"/round*.txt <<'PY'
import statistics, sys
rtt_file, order, configured, rounds = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4:]
def kvs(path):
    for line in open(path):
        yield dict(f.split("=", 1) for f in line.split() if "=" in f)
rtt = {kv["path"]: kv for kv in kvs(rtt_file)}
runs, errors = {}, {}
for path in rounds:
    for kv in kvs(path):
        key = (kv["path"], kv["mode"], int(kv.get("frame", 0)))
        if "error" in kv:
            errors[key] = errors.get(key, 0) + 1
            continue
        runs.setdefault(key, []).append(kv)
def med(key, field="mib_per_s"):
    v = [float(r[field]) for r in runs.get(key, []) if r.get(field, "-") != "-"]
    return (statistics.median(v), min(v), max(v), len(v)) if v else None
def cell(m, fmt="{:.0f}"):
    return "-" if m is None else (fmt + " (" + fmt + ".." + fmt + ")").format(m[0], m[1], m[2])
print()
print("| path | RTT configured | RTT measured (connect + 1 B) | raw TCP MiB/s | chanserv 1 MiB frames | ratio | chanserv 64 KiB frames | ratio | first byte ms raw / 1 MiB / 64 KiB |")
print("|---|---|---|---|---|---|---|---|---|")
for p in order:
    raw, big, small = med((p, "raw", 0)), med((p, "chanserv", 1048576)), med((p, "chanserv", 65536))
    ratio = lambda c: f"{c[0] / raw[0]:.2f}" if c and raw else "-"
    tt = " / ".join("-" if med(k, "ttfb_ms") is None else f"{med(k, 'ttfb_ms')[0]:.1f}"
                    for k in ((p, "raw", 0), (p, "chanserv", 1048576), (p, "chanserv", 65536)))
    r = rtt.get(p, {})
    meas = f"{r['connect_ms']} + {r['rtt_ms']} ms" if r else "-"
    conf = configured if p == "delay" else "0 (no delay)"
    print(f"| {p} | {conf} | {meas} | {cell(raw)} | {cell(big)} | {ratio(big)} | {cell(small)} | {ratio(small)} | {tt} |")
n = max((len(v) for v in runs.values()), default=0)
print(f"\nMiB/s: median (min..max) of {n} rounds; each run a fresh client process.")
for k, c in sorted(errors.items()):
    print(f"FAILED: path={k[0]} mode={k[1]} frame={k[2]}: {c} run(s)")
PY
echo "$YAMUX"
echo "$CREDIT"
echo "$PROXY"
