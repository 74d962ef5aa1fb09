#!/usr/bin/env bash
# Multi-host fault script (issue 9): chanserv nodes on separate "hosts" (network
# namespaces on a bridge), a fan-out across 3 servers, then one fault at a time,
# mid-stream, with recovery in between:
#   cut     the server's link goes down on the bridge for $CUT_S s
#   freeze  the server process is stopped (SIGSTOP) for $FREEZE_S s
#   kill    the server process is killed (SIGKILL), restarted $KILL_S s later
# For each: how long until every affected source failed, whether anything hung, the
# time to reconnect, and the bytes verified.
#
#   sudo scripts/faults.sh                  # about 90 s; needs root and iproute2
#   FAULTS_KEEP=1 sudo scripts/faults.sh    # keep the nodes' logs
#
# Nothing leaves the machine: the bridge lives in a namespace of its own, the hosts
# use 10.77.0.0/24 only inside their namespaces, and every namespace and process the
# script made is removed on exit (any exit). The whole run is bounded by
# FAULTS_TIMEOUT (300 s). Exit status: 0 when no source hung, 1 otherwise.
set -eu

cd "$(dirname "$0")/.."
. scripts/netns.sh # netns_teardown, netns_report
[[ $EUID -eq 0 ]] || { echo "faults.sh: run as root (network namespaces)" >&2; exit 2; }
if [[ -z ${FAULTS_INNER:-} ]]; then
    if [[ -z ${FAULTNODE:-} ]]; then
        cargo build --release --example faultnode -q
    fi
    FAULTS_INNER=1 exec timeout -k 20 "${FAULTS_TIMEOUT:-300}" "$0" "$@"
fi

BIN=${FAULTNODE:-$PWD/target/release/examples/faultnode}
CUT_S=10 FREEZE_S=10 KILL_S=3
KA=500,2000     # keep-alive interval,timeout (ms) on every node
HANG_MS=6000    # the client calls a source hung after this long without a frame
SERVE=(--name paced --sources 4 --frames 400 --size 4096 --interval-ms 20 --keepalive-ms $KA)
PORT=7000
P=chfault$$     # prefix of everything this run makes
SW=$P-sw
declare -A IP=([s1]=10.77.0.11 [s2]=10.77.0.12 [s3]=10.77.0.13 [c]=10.77.0.100)
declare -A PID ID
NETNS=()
LOG=$(mktemp -d /tmp/chanserv-faults.XXXXXX)
HUNG_TOTAL=0

now() { date +%s%3N; }
say() { printf '%s\n' "$*"; }

cleanup() {
    set +e
    exec 2>/dev/null # no job-control notices for the processes killed here
    netns_teardown "${PID[@]}"
    if [[ -n ${FAULTS_KEEP:-} ]]; then say "logs kept in $LOG"; else rm -rf "$LOG"; fi
    netns_report "$P"
}
trap cleanup EXIT
trap 'say "faults.sh: interrupted (timeout?)"; exit 124' INT TERM

# wait_until SECONDS 'shell condition'
wait_until() {
    local end=$(($(now) + $1 * 1000))
    until eval "$2"; do
        (($(now) < end)) || return 1
        sleep 0.2
    done
}

# ------------------------------------------------------------------ the world
# One "switch" namespace holding a bridge; each host a namespace with one veth into it.
ip netns add "$SW" && NETNS+=("$SW")
ip -n "$SW" link set lo up
ip -n "$SW" link add br0 type bridge
ip -n "$SW" link set br0 up
for h in s1 s2 s3 c; do
    ip netns add "$P-$h" && NETNS+=("$P-$h")
    ip -n "$SW" link add "sw-$h" type veth peer name eth0 netns "$P-$h"
    ip -n "$SW" link set "sw-$h" master br0 up
    ip -n "$P-$h" addr add "${IP[$h]}/24" dev eth0
    ip -n "$P-$h" link set eth0 up
    ip -n "$P-$h" link set lo up
done

start_server() { # host: (re)starts its server, sets PID and ID
    local h=$1 before
    touch "$LOG/$h.out"
    before=$(grep -c '^ready' "$LOG/$h.out" || true)
    ip netns exec "$P-$h" "$BIN" serve --listen "${IP[$h]}:$PORT" "${SERVE[@]}" \
        >>"$LOG/$h.out" 2>>"$LOG/$h.err" &
    PID[$h]=$!
    wait_until 10 "(( \$(grep -c '^ready' $LOG/$h.out) > $before ))" ||
        { say "server $h did not start:"; cat "$LOG/$h.err"; exit 1; }
    ID[$h]=$(awk '$1 == "ready" { id = $2 } END { print id }' "$LOG/$h.out")
}
for h in s1 s2 s3; do start_server $h; done
say "world: switch $SW (bridge br0), hosts s1 s2 s3 (servers) and c (client) on 10.77.0.0/24"
for h in s1 s2 s3; do say "  $h ${IP[$h]}:$PORT node ${ID[$h]} pid ${PID[$h]}"; done

ip netns exec "$P-c" "$BIN" post --join "${IP[s1]}:$PORT,${IP[s2]}:$PORT,${IP[s3]}:$PORT" \
    --name paced --parallel 6 --hang-ms $HANG_MS --keepalive-ms $KA \
    >"$LOG/c.out" 2>"$LOG/c.err" &
PID[c]=$!
C=$LOG/c.out

# ------------------------------------------------------------------ measurements
ok_from() { # node-id since-ms: sources completed OK from that node that started after
    awk -v id="$1" -v t="$2" '$1 == "source" && $4 == "ok" && index($0, "node=" id) {
        split($0, a, "start="); if (a[2] + 0 >= t + 0) n++ } END { print n + 0 }' "$C"
}
open_reqs() { # node-id: requests in flight on it (first source arrived, not ended)
    awk -v id="$1" '$1 == "req" && $3 == "node=" id { o[$2] = 1 }
        $1 == "req" && $3 == "end" { delete o[$2] }
        END { for (r in o) printf "%s ", r }' "$C"
}
all_ended() { # "req req ...": true when every one has its end line
    local r
    for r in $1; do grep -q "^req $r end" "$C" || return 1; done
}

# report NAME SERVER OLD-ID NEW-ID T0 T-FAULT T-RESTORE "OPEN REQS"
report() {
    awk -v old="$3" -v new="$4" -v t0="$5" -v tf="$6" -v tr="$7" -v open=" $8 " \
        -v now="$(now)" -v srv="$LOG/$2.out" -v killed="$([[ $1 == kill ]] && echo 1)" -v me="$2" '
    function kv(   i, a) { delete V; for (i = 1; i <= NF; i++) if (split($i, a, "=") == 2) V[a[1]] = a[2] + 0 }
    function ms(x) { return x == "" ? "never" : sprintf("%d ms", x) }
    { kv() }
    $1 == "clock" { client = $3; sub("node=", "", client) }
    $1 == "source" && V["end"] >= t0 && V["end"] <= now { bytes += V["bytes"] }
    $1 == "source" && index(open, " " $2 " ") && $0 ~ ("node=" old) {
        n++; out[$4]++
        if ($4 == "err") { kinds[$5]++; d = V["end"] - tf; if (d > fmax) fmax = d }
        if ($4 == "hung") {
            s = V["last"] - tf; if (stall == "" || s < stall) stall = s
            r = $0; sub(/.*repoll=/, "", r); sub(/ .*/, "", r); rk[r]++
        }
        next
    }
    $1 == "source" && $4 != "ok" && V["end"] >= tf && V["end"] <= now { other++ }
    $1 == "req" && $3 == "end" && $4 != "ok" && !index(open, " " $2 " ") && V["t"] >= tf { lost++; lk[$4 ($5 ~ /=/ ? "" : " " $5)]++ }
    $1 == "link" && $2 == "down" && $3 == old && V["t"] >= tf && down == "" { down = V["t"] - tf }
    $1 == "link" && $2 == "up" && $3 == new && V["t"] >= tr && up == "" { up = V["t"] - tr }
    $1 == "req" && $3 == "node=" new && V["t"] >= tr && served == "" { served = V["t"] - tr }
    $1 == "source" && $4 == "ok" && $0 ~ ("node=" new) && V["start"] >= tr && first == "" { first = V["end"] - tr }
    END {
        gsub(/^ +| +$/, "", open); gsub(/ +/, " ", open)
        printf "  in flight on %s at the fault: %d sources (requests %s)\n", me, n, open
        printf "  their fate: ok %d, err %d, hung %d", out["ok"], out["err"], out["hung"]
        for (k in kinds) printf "  [%s x%d]", k, kinds[k]
        printf "\n"
        if (out["hung"] > 0) {
            printf "  every affected source failed after: NEVER: %d HUNG (last frame %d ms %s the fault; dropped by the %d s watchdog)\n",
                out["hung"], stall < 0 ? -stall : stall, stall < 0 ? "before" : "after", '"$HANG_MS"' / 1000
            printf "  polled once more by the watchdog, they gave:"
            for (k in rk) printf "  [%s x%d]", k, rk[k]
            printf "%s\n", ("pending" in rk) ? "" : " (ready, but their task was never woken)"
        } else if (out["err"] > 0) printf "  every affected source failed after: %d ms\n", fmax
        else printf "  every affected source failed after: none failed\n"
        printf "  client saw the link down after: %s\n", ms(down)
        if (killed) printf "  server side: process killed\n"
        else {
            while ((getline line < srv) > 0) {
                split(line, w, " "); t = line; sub(/.* t=/, "", t); t += 0
                if (w[1] == "dropped" && t >= tf) { drops++; last = t - tf }
                if (w[1] == "link" && w[2] == "down" && w[3] == client && t >= tf && sdown == "") sdown = t - tf
                if (w[1] == "error_mass" && t >= tf) mass++
            }
            printf "  server saw the link down after: %s; dropped producers: %d of %d%s%s\n", ms(sdown), drops, n,
                drops ? sprintf(" (last %d ms after the fault)", last) : "", mass ? "; ERROR MASS pause" : ""
        }
        printf "  other requests that failed meanwhile: %d", lost
        for (k in lk) printf "  [%s x%d]", k, lk[k]
        printf "; failed sources on other servers: %d\n", other
        printf "  reconnect after %s: link up %s, first request served %s, first source complete %s\n",
            killed ? "restart" : "restore", ms(up), ms(served), ms(first)
        printf "  bytes verified during this phase: %.1f MiB\n", bytes / 1048576
        exit (out["hung"] > 0 ? 1 : 0)
    }' "$C"
}

fault() { # NAME SERVER HOLD-SECONDS INJECT RESTORE
    local name=$1 h=$2 hold=$3 inject=$4 restore=$5 t0 tf tr open old rc=0
    t0=$(now)
    say ""
    say "== $name: ${h} (node ${ID[$h]}) =="
    wait_until 30 "[[ -n \$(open_reqs ${ID[$h]}) ]]" || say "  (no request in flight on $h)"
    sleep 2 # mid-stream
    open=$(open_reqs "${ID[$h]}") old=${ID[$h]}
    tf=$(now)
    $inject "$h"
    sleep "$hold"
    tr=$(now)
    $restore "$h"
    say "  fault at +$((tf - t0)) ms, restored after $((tr - tf)) ms"
    wait_until 45 "all_ended '$open' && (( \$(ok_from ${ID[$h]} $tr) > 0 ))" ||
        say "  (no full recovery within 45 s)"
    report "$name" "$h" "$old" "${ID[$h]}" "$t0" "$tf" "$tr" "$open" || rc=1
    ((HUNG_TOTAL += rc)) || true
}
cut_on() { ip -n "$SW" link set "sw-$1" down; }
cut_off() { ip -n "$SW" link set "sw-$1" up; }
freeze_on() { kill -STOP "${PID[$1]}"; }
freeze_off() { kill -CONT "${PID[$1]}"; }
kill_on() { kill -KILL "${PID[$1]}"; wait "${PID[$1]}" 2>/dev/null || true; }
kill_off() { start_server "$1"; }

# ------------------------------------------------------------------ the run
say ""
say "== baseline: client on c, 6 lanes of requests (4 sources x 400 frames x 4 KiB, 20 ms apart) =="
T0=$(now)
wait_until 40 "(( \$(ok_from ${ID[s1]} 0) > 0 && \$(ok_from ${ID[s2]} 0) > 0 && \$(ok_from ${ID[s3]} 0) > 0 ))" ||
    { say "  no complete fan-out within 40 s"; cat "$LOG/c.err"; exit 1; }
for h in s1 s2 s3; do say "  $h: $(ok_from "${ID[$h]}" 0) sources complete"; done
say "  failed so far: $(awk '$1 == "source" && $4 != "ok"' "$C" | wc -l), fan-out took $(($(now) - T0)) ms"
say "  (per fault: \"first request served\" waits for a lane to free up; requests last 8 s)"

fault cut s1 $CUT_S cut_on cut_off
fault freeze s2 $FREEZE_S freeze_on freeze_off
fault kill s3 $KILL_S kill_on kill_off

say ""
say "== end =="
kill -TERM "${PID[c]}"
wait_until 20 "grep -q '^summary' $C" || say "  client did not finish within 20 s"
grep '^summary' "$C" | sed 's/^/  /' || true
say "  faults with hung sources: $HUNG_TOTAL of 3"
((HUNG_TOTAL == 0))
