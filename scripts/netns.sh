# shellcheck shell=bash
# Sourced by the scripts that build network namespaces (wan.sh, hosts.sh, faults.sh):
# their common teardown. Not a script of its own.

# Kills the given processes and every process in the namespaces named in the NETNS
# array, waits for them, then deletes those namespaces. Run from an EXIT trap with
# `set +e` and stderr silenced (no job-control notices for the processes killed).
netns_teardown() { # pid...
    local pid ns
    for pid in "$@"; do kill -KILL "$pid"; done
    for ns in "${NETNS[@]}"; do
        for pid in $(ip netns pids "$ns"); do kill -KILL "$pid"; done
    done
    wait
    for ns in "${NETNS[@]}"; do ip netns del "$ns"; done
}

# "cleanup: N namespaces deleted, M left", M counting those whose names start with
# the prefix $1 (the run's own).
netns_report() { # prefix
    echo "cleanup: ${#NETNS[@]} namespaces deleted, $(ip netns list | grep -c "^$1-") left"
}
