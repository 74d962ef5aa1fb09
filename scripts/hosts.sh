#!/usr/bin/env bash
# The mesh across hosts (issue 14): chanserv nodes in network namespaces, linked only
# along a chain and around a ring, driven with the command line as a user would.
#
#   sudo scripts/hosts.sh                          # about a minute; root and iproute2
#   sudo HOSTS_PINGS=500 HOSTS_MIB=512 HOSTS_ROUNDS=5 scripts/hosts.sh
#   sudo HOSTS_KEEPALIVE=1s HOSTS_KEEPALIVE_TIMEOUT=3s scripts/hosts.sh   # the ring's
#   sudo HOSTS_LOG=chanserv=trace scripts/hosts.sh  # each process's log: $RESULTS/*.err
#
# Every host is a namespace running one `chanserv node --no-relay` (routing is the
# library's mesh alone, not the CLI's relay); its services (`chanserv serve`) and
# clients (`chanserv post`, `ping`, `names`, `routes`) are processes on the same host
# joined to it over loopback, so a client's request crosses its own host's node, every
# node between, and the service's host's node. Hosts are linked by veth pairs, a /24
# per link, and each node joins only its neighbours. No netem in this kernel: links
# have no delay; what is measured is the cost of the software on the path.
#
# Chain c1 - c2 - c3 - c4 - c5, clients on c1, an echo and a directory service on
# every host (so 0 to 4 hops away):
#   convergence  a service started on cK: time from its start (the `chanserv serve`
#                process, which joins cK's node and binds its name) to its name
#                appearing at c1: c1's own `names` event, and by polling `chanserv
#                names` every 50 ms as a user would see it;
#   latency      `chanserv ping` of HOSTS_PINGS (200) small requests, one after
#                another, to the echo on each host: median, p90, min, max;
#   throughput   one source of HOSTS_MIB (256) MiB of random bytes, a file served by
#                `chanserv serve --dir`, posted with `chanserv post --out` into tmpfs:
#                MiB/s by post's own clock (from the request to the source's end),
#                HOSTS_ROUNDS (3) rounds interleaved, every copy's sha256 checked.
# Ring r1 - r2 - r3 - r4 - r1 (keep-alive HOSTS_KEEPALIVE 500ms, timeout
# HOSTS_KEEPALIVE_TIMEOUT 2s), an echo and a slow stream (a line every 50 ms for 20 s)
# on r3, clients on r1. Both ways round are 2 hops; r1's route picks one (`chanserv
# routes`). With a slow post in flight and a ping every 100 ms (1 s deadline each),
# the link from the chosen middle host to r3 is cut (both veth ends down):
#   whether and when the in-flight post fails, when r1's route to the service moves to
#   the other way round, when the first request sent after the cut is answered (and
#   through which way); then the link comes back up: when the route returns.
#
# Every figure is measured here; waits are bounded polls of events or commands, and a
# wait that runs out fails the script. Nothing leaves the machine (10.79.0.0/16 and
# 10.80.0.0/16 exist only inside the namespaces). Namespaces and processes are removed
# on any exit; the whole run is bounded by HOSTS_TIMEOUT (300 s). Logs and result
# lines go to $RESULTS (default target/hosts/).
set -euo pipefail
shopt -s inherit_errexit # a failure inside $(...) fails the script too
export LC_ALL=C # a '.' in $EPOCHREALTIME and in printf's numbers

cd "$(dirname "$0")/.."
. scripts/netns.sh # netns_teardown, netns_report
[[ $EUID -eq 0 ]] || { echo "hosts.sh: run as root (network namespaces)" >&2; exit 2; }
if [[ -z ${HOSTS_INNER:-} ]]; then
    cargo build --release --quiet -p chanserv-cli
    HOSTS_INNER=1 exec timeout -k 20 "${HOSTS_TIMEOUT:-300}" "$0" "$@"
fi

CS=$PWD/target/release/chanserv
PINGS=${HOSTS_PINGS:-200}
MIB=${HOSTS_MIB:-256}
ROUNDS=${HOSTS_ROUNDS:-3}
KA=(--keepalive "${HOSTS_KEEPALIVE:-500ms}" --keepalive-timeout "${HOSTS_KEEPALIVE_TIMEOUT:-2s}")
LOGS=${HOSTS_LOG:-warn,chanserv=debug,chanserv::mux::control=info} # on each one's stderr
CLOSE_S=2 # the library's close deadline (NodeConfig::close_timeout), not a CLI flag
OUT=${RESULTS:-$PWD/target/hosts}
P=chh$$ # prefix of the namespaces this run makes
PORT=7000
LOCAL=127.0.0.1:$PORT # every client and service joins its own host's node here
NETNS=() PIDS=()
declare -A PID=() ID=() LABEL=()
LOG=$(mktemp -d /dev/shm/chanserv-hosts.XXXXXX) # tmpfs: the big file and its copies

exec 3>&2 # the cleanup's report, once stderr is silenced
cleanup() {
    set +e
    exec 2>/dev/null # no job-control notices for the processes killed here
    netns_teardown "${PIDS[@]}"
    mkdir -p "$OUT" && cp "$LOG"/*.out "$LOG"/*.err "$OUT"/ 2>/dev/null
    rm -rf "$LOG"
    netns_report "$P" >&3
}
trap cleanup EXIT
trap 'echo "hosts.sh: interrupted (timeout?)" >&2; exit 124' INT TERM

fail() { echo "hosts.sh: $*" >&2; exit 1; }
unlogged() { grep -v -E '^[0-9-]+T[0-9:.]+Z ' "$1" || true; } # a file's lines but the log's
now() { echo "${EPOCHREALTIME/./}"; } # µs since the epoch
ms() { awk -v d="$1" 'BEGIN { printf "%.1f", d / 1000 }'; } # µs -> "12.3" (ms)
secs() { awk -v d="$1" 'BEGIN { printf "%.2f", d / 1e6 }'; } # µs -> "1.23" (s)
# Each line of stdin with the time it was read in front (µs since the epoch).
stamp() { while IFS= read -r line; do printf '%s %s\n' "${EPOCHREALTIME/./}" "$line"; done; }

# ------------------------------------------------------------------ hosts and links
host() { ip netns add "$P-$1" && NETNS+=("$P-$1"); ip -n "$P-$1" link set lo up; }
# link A B NET: a veth pair between hosts A and B, NET.1 on A, NET.2 on B; in each,
# the interface is named after the other end ("to-b" in A).
link() {
    local a=$1 b=$2 net=$3
    ip -n "$P-$a" link add "to-$b" type veth peer name "to-$a" netns "$P-$b"
    ip -n "$P-$a" addr add "$net.1/24" dev "to-$b" && ip -n "$P-$a" link set "to-$b" up
    ip -n "$P-$b" addr add "$net.2/24" dev "to-$a" && ip -n "$P-$b" link set "to-$a" up
}
# set_link A B up|down: both ends of the link between A and B.
set_link() { ip -n "$P-$1" link set "to-$2" "$3" && ip -n "$P-$2" link set "to-$1" "$3"; }

# on HOST CMD...: a chanserv command on HOST, in the foreground, bounded.
on() { local h=$1; shift; ip netns exec "$P-$h" timeout 120 "$CS" --log "$LOGS" "$@"; }
# bg NAME HOST CMD...: a chanserv command on HOST in the background; its stdout lines
# stamped into $LOG/NAME.out, its stderr in $LOG/NAME.err; its pid in PID[NAME].
bg() {
    local name=$1 h=$2
    shift 2
    ip netns exec "$P-$h" "$CS" --log "$LOGS" "$@" > >(stamp >"$LOG/$name.out") 2>"$LOG/$name.err" &
    PIDS+=($!)
    PID[$name]=$!
}
# await NAME REGEX SECS [SINCE]: the stamp of the first line of NAME matching REGEX
# (after the stamp) and stamped after SINCE (µs); fails the script if none comes
# within SECS.
await() {
    local name=$1 re=$2 since=${4:-0} end line
    end=$(($(now) + $3 * 1000000))
    while :; do
        line=$(grep -E "^[0-9]+ $re" "$LOG/$name.out" 2>/dev/null | awk -v t="$since" '$1 > t { print; exit }' || true)
        [[ -n $line ]] && { echo "${line%% *}"; return 0; }
        if (($(now) > end)) || ! kill -0 "${PID[$name]}" 2>/dev/null; then
            echo "hosts.sh: $name: no line /$re/ within $3 s; its stderr:" >&2
            tail -5 "$LOG/$name.err" >&2
            exit 1
        fi
        sleep 0.01
    done
}
# poll SECS CMD...: runs CMD every 50 ms until it succeeds; false after SECS.
poll() {
    local end=$(($(now) + $1 * 1000000))
    shift
    until "$@"; do
        (($(now) < end)) || return 1
        sleep 0.05
    done
}
# node NAME HOST ARGS...: a mesh node on HOST (listening on every address there),
# ready; its id in ID[NAME].
node() {
    local name=$1 h=$2
    shift 2
    bg "$name" "$h" node --name "$name" --listen "0.0.0.0:$PORT" --no-relay "$@"
    await "$name" ready 10 >/dev/null
    ID[$name]=$(sed -n 's/^[0-9]* node //p' "$LOG/$name.out")
    LABEL[${ID[$name]}]=$name
}
# service NAME HOST ARGS...: `chanserv serve NAME ARGS` on HOST joined to its node,
# ready; the time it was started in LAUNCHED.
service() {
    local name=$1 h=$2
    shift 2
    LAUNCHED=$(now)
    bg "$name" "$h" serve "$name" --join "$LOCAL" "$@"
    await "$name" ready 10 >/dev/null
    ID[$name]=$(sed -n 's/^[0-9]* node //p' "$LOG/$name.out")
    LABEL[${ID[$name]}]=$name
}
# sees HOST NAME: HOST's node lists NAME.
sees() { on "$1" names --join "$LOCAL" 2>/dev/null | grep -q "^$2 "; }
# path HOST DEST: HOST's route to the node DEST (by name) as names, "r2>r3>echo".
path() {
    local p
    p=$(on "$1" routes --join "$LOCAL" 2>/dev/null | awk -v id="${ID[$2]}" '$1 == "route" && $2 == id { print $6 }')
    [[ -n $p ]] || return 1
    local out=() hop
    for hop in ${p//,/ }; do out+=("${LABEL[$hop]:-$hop}"); done
    (IFS='>' && echo "${out[*]}")
}
# via HOST DEST HOP: HOST's route to DEST goes to HOP first.
via() { local p; p=$(path "$1" "$2") && [[ ${p%%>*} == "$3" ]]; }

mkdir -p "$OUT"
rm -f "$OUT"/*.out "$OUT"/*.err
RES=$OUT/results.txt
: >"$RES"
echo "hosts: $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg); logs in $OUT" >&2

# ------------------------------------------------------------------ the chain
CHAIN=(c1 c2 c3 c4 c5)
for h in "${CHAIN[@]}"; do host "$h"; done
for i in 1 2 3 4; do link "c$i" "c$((i + 1))" "10.79.$i"; done
node c1 c1
for i in 2 3 4 5; do node "c$i" "c$i" --join "10.79.$((i - 1)).1:$PORT"; done
poll 10 path c1 c5 >/dev/null || fail "c1 has no route to c5"
echo "chain: c1 reaches c5 by $(path c1 c5)" >&2

# Convergence: one echo at a time, nearest first, each awaited at c1 before the next.
for i in 1 2 3 4 5; do
    service "echo-c$i" "c$i" --echo
    seen=$(await c1 "names ${ID[echo-c$i]} .*\+echo-c$i( |$)" 10)
    poll 10 sees c1 "echo-c$i" || fail "c1 does not list echo-c$i"
    polled=$(now)
    echo "conv host=c$i hops=$((i - 1)) event_ms=$(ms $((seen - LAUNCHED))) poll_ms=$(ms $((polled - LAUNCHED))) path=$(path c1 "echo-c$i")" >>"$RES"
done

# Latency: requests one after another from one client on c1.
for i in 1 2 3 4 5; do
    on c1 ping "echo-c$i" hello --join "$LOCAL" --count "$PINGS" --interval 0 >"$OUT/ping-c$i.txt" 2>"$LOG/ping-c$i.err" ||
        fail "ping echo-c$i: $(tail -1 "$OUT/ping-c$i.txt")"
    # Every time, for the table's percentiles, and ping's own summary.
    times=$(awk '$1 == "ping" && / bytes=5$/ { sub(/^time_ms=/, "", $3); printf "%s%s", sep, $3; sep = "," }' "$OUT/ping-c$i.txt")
    echo "ping host=c$i hops=$((i - 1)) times_ms=$times $(sed -n 's/^done //p' "$OUT/ping-c$i.txt")" >>"$RES"
done

# Throughput: one file, served from every host, posted from c1 into tmpfs.
mkdir -p "$LOG/pub"
head -c $((MIB << 20)) /dev/urandom >"$LOG/pub/big.bin"
SHA=$(sha256sum <"$LOG/pub/big.bin" | cut -d' ' -f1)
for i in 1 2 3 4 5; do service "files-c$i" "c$i" --dir "$LOG/pub"; done
for i in 1 2 3 4 5; do poll 10 sees c1 "files-c$i" || fail "c1 does not list files-c$i"; done
for r in $(seq 1 "$ROUNDS"); do
    echo "chain: throughput round $r/$ROUNDS $(date -u +%H:%M:%S)" >&2
    for i in 1 2 3 4 5; do
        rm -rf "$LOG/got"
        on c1 post "files-c$i" --join "$LOCAL" --out "$LOG/got" 2>"$LOG/post.err" >/dev/null ||
            fail "post files-c$i: $(unlogged "$LOG/post.err" | tail -2)"
        got=$(sha256sum <"$LOG/got/big.bin" | cut -d' ' -f1)
        # post's last line: "1 sources (0 failed), <bytes> bytes in <secs> s"
        awk -v h="c$i" -v hops=$((i - 1)) -v r="$r" -v ok="$([[ $got == "$SHA" ]] && echo yes || echo NO)" \
            '/ bytes in / { printf "tput host=%s hops=%d round=%d bytes=%s secs=%s mib_per_s=%.1f sha256_same=%s\n",
                h, hops, r, $5, $8, $5 / 1048576 / $8, ok }' "$LOG/post.err" >>"$RES"
    done
done
rm -rf "$LOG/got" "$LOG/pub"
{ # silently: the shell's "Killed" notices go to this block's stderr
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" || true; done
} 2>/dev/null
PIDS=()

# ------------------------------------------------------------------ the ring
RING=(r1 r2 r3 r4)
for h in "${RING[@]}"; do host "$h"; done
link r1 r2 10.80.1 && link r2 r3 10.80.2 && link r3 r4 10.80.3 && link r4 r1 10.80.4
node r1 r1 "${KA[@]}"
node r2 r2 "${KA[@]}" --join "10.80.1.1:$PORT"
node r3 r3 "${KA[@]}" --join "10.80.2.1:$PORT"
node r4 r4 "${KA[@]}" --join "10.80.3.1:$PORT" --join "10.80.4.2:$PORT"
service echo r3 --echo
# shellcheck disable=SC2016 # for sh -c
service slow r3 --exec sh -c 'i=0; while [ $i -lt 400 ]; do echo "line $i"; sleep 0.05; i=$((i + 1)); done'
poll 10 sees r1 echo || fail "r1 does not list echo"
poll 10 sees r1 slow || fail "r1 does not list slow"
BEFORE=$(path r1 echo)
MID=${BEFORE%%>*} # the middle host on the current way, r2 or r4
OTHER=$([[ $MID == r2 ]] && echo r4 || echo r2)
echo "ring: r1 reaches echo by $BEFORE; cutting $MID-r3" >&2

bg prober r1 ping echo hello --join "$LOCAL" "${KA[@]}" --count 100000 --interval 100ms --request-timeout 1s
await prober "ping seq=[0-9]+ .* bytes=5$" 10 >/dev/null
bg inflight r1 post slow --join "$LOCAL" "${KA[@]}" --output json
await inflight '\{"event":"frame"' 10 >/dev/null
sleep 0.5 # a few frames and pings on the old way before the cut

T_CUT=$(now)
set_link "$MID" r3 down
poll 15 via r1 echo "$OTHER" || fail "r1's route to echo did not move to $OTHER"
T_MOVED=$(now)
AFTER=$(path r1 echo)
# The in-flight post ends: status 3 (a source failed) or 2 (the request failed).
for _ in $(seq 300); do kill -0 "${PID[inflight]}" 2>/dev/null || break; sleep 0.05; done
kill -0 "${PID[inflight]}" 2>/dev/null && fail "the in-flight post still runs 15 s after the cut"
T_ENDED=$(now)
wait "${PID[inflight]}" && INFLIGHT_STATUS=0 || INFLIGHT_STATUS=$?
# The first error line it printed, and the last frame before it.
T_ERR=$(grep -m1 -E '"event":"(error|request_error)"' "$LOG/inflight.out" | cut -d' ' -f1 || true)
ERR_MSG=$(grep -m1 -E '"event":"(error|request_error)"' "$LOG/inflight.out" | sed 's/.*"error":"\([^"]*\)".*/\1/' || true)
FRAMES=$(grep -c '"event":"frame"' "$LOG/inflight.out" || true)
# The first request sent after the cut that was answered (a ping line's stamp minus
# its time is when the request went out).
first_new_reply() {
    awk -v cut="$T_CUT" '$2 == "ping" && $NF ~ /^bytes=/ { split($4, kv, "="); sent = $1 - kv[2] * 1000
        if (sent > cut) { print $1; exit } }' "$LOG/prober.out"
}
answered() { [[ -n $(first_new_reply) ]]; }
poll 15 answered || fail "no request sent after the cut was answered within 15 s"
T_REPLY=$(first_new_reply)
LOST=$(awk -v cut="$T_CUT" -v until="$T_REPLY" '$2 == "ping" && $1 > cut && $1 < until && /error=/' "$LOG/prober.out" | wc -l)
REPLY_PATH=$(path r1 echo)

T_UP=$(now)
set_link "$MID" r3 up
poll 20 via r1 echo "$MID" || fail "r1's route to echo did not come back through $MID"
T_BACK=$(now)
BACK=$(path r1 echo)
T_LINK=$(await "$MID" "link up ${ID[r3]} " 1 "$T_UP")
# The prober must be answered after the route came back too.
await prober "ping seq=[0-9]+ .* bytes=5$" 10 "$T_BACK" >/dev/null
kill -INT "${PID[prober]}"
await prober "done " 5 >/dev/null
PROBE_DONE=$(grep -m1 ' done ' "$LOG/prober.out" | cut -d' ' -f3-)
{
    echo "ring before=$BEFORE cut=$MID-r3"
    echo "ring event=route_moved after_s=$(secs $((T_MOVED - T_CUT))) path=$AFTER"
    echo "ring event=inflight_failed after_s=$(secs $((${T_ERR:-$T_ENDED} - T_CUT))) status=$INFLIGHT_STATUS frames=$FRAMES exited_s=$(secs $((T_ENDED - T_CUT))) error=$ERR_MSG"
    echo "ring event=first_new_reply after_s=$(secs $((T_REPLY - T_CUT))) path=$REPLY_PATH failed_between=$LOST"
    echo "ring event=route_back after_restore_s=$(secs $((T_BACK - T_UP))) link_up_s=$(secs $((T_LINK - T_UP))) path=$BACK"
    echo "ring prober $PROBE_DONE"
} >>"$RES"

# ------------------------------------------------------------------ the tables
python3 - "$RES" "${HOSTS_KEEPALIVE_TIMEOUT:-2s}" "$CLOSE_S" "$PINGS" "$MIB" <<'PY'
import statistics, sys
res, ka_timeout, close_s, pings, mib = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
def kvs(line):
    return dict(f.split("=", 1) for f in line.split() if "=" in f)
def seconds(d):  # "2s", "2500ms", "1.5" as the CLI reads them (m and h unlikely here)
    if d.endswith("ms"): return float(d[:-2]) / 1000
    return float(d.rstrip("s"))
lines = [l.rstrip("\n") for l in open(res)]
conv = [kvs(l) for l in lines if l.startswith("conv ")]
ping = {kvs(l)["host"]: kvs(l) for l in lines if l.startswith("ping ")}
tput = {}
for l in lines:
    if l.startswith("tput "):
        kv = kvs(l)
        tput.setdefault(kv["host"], []).append(kv)
def latency(p):
    t = sorted(float(x) for x in p.get("times_ms", "").split(",") if x)
    if not t: return "-"
    p90 = t[min(len(t) - 1, round(0.9 * len(t)) - 1)]
    return f"{statistics.median(t):.2f} ({p90:.2f}; {t[0]:.2f}..{t[-1]:.2f})"
print()
print("Chain c1-c2-c3-c4-c5, clients on c1: client > c1 > ... > cK > service")
print()
print("| service on | hops | name at c1 after the service started: event / polled | request ms: median (p90; min..max) | ok/sent | one source MiB/s: median (min..max) | sha256 |")
print("|---|---|---|---|---|---|---|")
for c in conv:
    h = c["host"]
    p = ping.get(h, {})
    runs = tput.get(h, [])
    mibs = [float(r["mib_per_s"]) for r in runs]
    tp = f"{statistics.median(mibs):.0f} ({min(mibs):.0f}..{max(mibs):.0f})" if mibs else "-"
    same = f"{len(runs)} of {len(runs)} same" if runs and all(r["sha256_same"] == "yes" for r in runs) else "DIFFERENT"
    print(f"| {h} | {c['hops']} | {c['event_ms']} / {c['poll_ms']} ms | {latency(p)} | {p.get('ok', '-')}/{p.get('sent', '-')} | {tp} | {same} |")
n = max((len(v) for v in tput.values()), default=0)
print(f"\nhops: links between c1 and the service's host (c1's route to echo-c5: {conv[-1]['path']}). "
      f"Requests: {pings} per row, one after another from one `chanserv ping`, each timed from the post to the end of its "
      f"source. One source: a {mib} MiB file in 64 KiB frames, `chanserv post --out` into tmpfs, by post's own clock, "
      f"{n} rounds interleaved; each copy's sha256 compared with the file's.")
ring = [l for l in lines if l.startswith("ring ")]
ev = {kvs(l).get("event"): (kvs(l), l) for l in ring}
before = kvs(ring[0])
bound = seconds(ka_timeout) + close_s
print()
print(f"Ring r1-r2-r3-r4-r1, service on r3, clients on r1; keep-alive timeout {ka_timeout}, close deadline {close_s:.0f} s")
print()
print("| event | seconds after the cut | detail |")
print("|---|---|---|")
print(f"| r1's route to the service before | - | {before['before']}; cut {before['cut']} (both ends down) |")
m = ev["route_moved"][0]
print(f"| r1's route moved the other way round | {m['after_s']} | {m['path']} |")
f, fl = ev["inflight_failed"]
err = fl.split(" error=", 1)[1] if " error=" in fl else ""
verdict = "failed" if f["status"] != "0" else "DID NOT FAIL"
within = "within" if float(f["after_s"]) <= bound else "NOT within"
print(f"| in-flight slow post {verdict} (exit status {f['status']}, {f['frames']} frames before) | {f['after_s']} | "
      f"{within} keep-alive timeout + close deadline ({bound:.1f} s); exited at {f['exited_s']} s: {err} |")
r = ev["first_new_reply"][0]
print(f"| first request sent after the cut answered | {r['after_s']} | {r['failed_between']} requests failed before it; route then {r['path']} |")
b = ev["route_back"][0]
print(f"| link up again: route back | {b['after_restore_s']} after the restore | {before['cut']} link up at {b['link_up_s']} s; {b['path']} |")
pr = kvs([l for l in ring if " prober " in l][0])
print(f"\nProber (a ping every 100 ms, 1 s deadline each, through cut and restore): sent {pr['sent']}, ok {pr['ok']}, "
      f"failed {pr['failed']}; median {pr['median_ms']} ms, max {pr['max_ms']} ms.")
PY
